"""Where one decode step's device time goes: a JAX profiler trace around steady decode steps.

    python benchmarks/step_profile.py --model /tmp/qwen-0.5b --dtype bfloat16 \\
        --batch-sizes 1,256 --context 512 --steps 10 --output-json /tmp/step_profile.json
    python benchmarks/random_model.py qwen2.5-0.5b /tmp/sp_model --num-layers 2 --dtype float32
    python benchmarks/step_profile.py --model /tmp/sp_model --batch-sizes 1,8 --context 64 --steps 3

One engine (`max_num_seqs` = the largest batch size) serves every batch size B in turn: B
requests with random prompts of `--context` tokens (ignore_eos, temperature 1) are stepped
until every one has its first token (prefill done), then a few warm-up decode steps (until a
step compiles nothing), then `--steps` decode steps are timed without the profiler (wall ms
per step, the runner's host / device ms per step from `runner.counters`), then `--steps` more
decode steps run inside `jax.profiler.trace` (the device drained before and after, so the
trace holds exactly those steps' device work). The requests are aborted before the next B.

The trace is read with `jax.profiler.ProfileData`: on a GPU the kernel and memcpy events of
the "/device:GPU:N" planes ("Stream #..." lines); on the CPU backend the XLA thunk events of
the host plane (events with an `hlo_op` stat). Per event name: self time per step (time
nested events take is left to them), calls per step and share of all op time; the device-busy
time per step is the union of the op intervals (per device, averaged over devices). Also by
HLO op (where it differs from the kernel name, e.g. cuBLAS kernels) and by XLA program.
A trace that cannot be taken or read leaves the timings in place and an error string in the
JSON ("trace_planes" and "trace_source" say what the trace held). Should a GPU trace show CUDA
graph launches rather than kernels, rerun with --disable-command-buffers. The last line is one
JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    # benchmarks/ itself must not lead sys.path: its datasets.py would shadow HF `datasets`
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import collections
import json
import os
import tempfile
import time
import warnings
from typing import Any, Optional

import numpy as np

from benchmarks import common

NAME_CHARS = 120
# lines the profiler's post-processing derives from the raw events (they would count twice)
DERIVED_LINES = {"Steps", "XLA Modules", "XLA Ops", "Async XLA Ops", "TensorFlow Ops",
                 "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope",
                 "Launch Stats", "Source code", "CUPTI overhead", "_counters_", "Host Offload Op",
                 "XLA TraceMe", "SparseCore Ops", "SparseCore Modules"}


def build_parser() -> argparse.ArgumentParser:
    p = common.parser_from_doc("step_profile", __doc__)
    common.add_engine_args(p)
    p.set_defaults(max_model_len=2048)
    g = p.add_argument_group("run")
    g.add_argument("--batch-sizes", default="1,256",
                   help="decode batch sizes to profile, comma separated")
    g.add_argument("--context", type=int, default=512, help="prompt tokens of every request")
    g.add_argument("--steps", type=int, default=10,
                   help="decode steps timed, and as many profiled, per batch size")
    g.add_argument("--warmup-steps", type=int, default=3,
                   help="decode steps before timing (more while a step still compiles)")
    g.add_argument("--top", type=int, default=25, help="rows of the op tables")
    g.add_argument("--no-profile", action="store_true", help="timings only, no trace")
    g.add_argument("--keep-trace", default=None, metavar="DIR",
                   help="write the traces here (one folder per batch size) and keep them")
    g.add_argument("--disable-command-buffers", action="store_true",
                   help="GPU: XLA_FLAGS += --xla_gpu_enable_command_buffer= (no CUDA graphs), "
                        "should the trace show graph launches instead of kernels; set before "
                        "JAX starts, so only from the command line")
    g.add_argument("--output-json", default=None, help="also write the JSON object to this file")
    return p


# -- the trace ---------------------------------------------------------------------------------


def _stats(event) -> dict:
    out = {}
    try:
        for item in event.stats:
            name, value = item[0], item[1]
            out.setdefault(name, value)
    except Exception:  # noqa: BLE001 - stats are a nicety
        pass
    return out


def _trunc(name: Any) -> str:
    name = str(name)
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def select_events(profile, platform: str) -> tuple[list[list[list[dict]]], str]:
    """The op events of the trace as devices -> lines -> events ({name, hlo_op, module, start,
    end} in ns), and a description of where they came from."""
    planes = list(profile.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:GPU:")] \
        if platform == "gpu" else \
        [p for p in planes if p.name.startswith("/device:") and platform != "cpu"
         and not p.name.startswith("/device:CUSTOM")]
    devices, where = [], ""
    if device_planes:
        for plane in device_planes:
            lines = list(plane.lines)
            chosen = [ln for ln in lines if ln.name.startswith("Stream #")]
            if not chosen:
                ops = [ln for ln in lines if ln.name == "XLA Ops"]
                chosen = ops or [ln for ln in lines if ln.name not in DERIVED_LINES]
            devices.append([_line_events(ln, need_hlo_op=False) for ln in chosen])
        names = sorted({ln.name for p in device_planes for ln in p.lines})
        where = (f"{len(device_planes)} device plane(s) {device_planes[0].name}...; "
                 f"lines: {', '.join(names)[:300]}")
    elif platform in ("gpu", "tpu", "rocm", "cuda"):
        raise RuntimeError(f"no /device:* plane in the trace of a {platform} run (the device "
                           f"tracer, e.g. CUPTI, did not record?); planes: "
                           f"{[p.name for p in planes]}")
    else:  # the CPU backend: XLA's thunks on the host plane carry an hlo_op stat
        host = [p for p in planes if p.name == "/host:CPU"] or \
            [p for p in planes if p.name.startswith("/host:")]
        lines = [ln for p in host for ln in p.lines]
        ops = [ln for ln in lines if ln.name == "XLA Ops"]
        chosen = ops or [ln for ln in lines if ln.name not in DERIVED_LINES and ln.name != "python"]
        per_line = [_line_events(ln, need_hlo_op=not ops) for ln in chosen]
        devices.append([evs for evs in per_line if evs])
        where = (f"host plane {host[0].name if host else '?'}: "
                 f"{sum(1 for e in per_line if e)} thread line(s) with XLA op (hlo_op) events")
    return devices, where


def _line_events(line, need_hlo_op: bool) -> list[dict]:
    out = []
    for e in line.events:
        dur = float(e.duration_ns)
        if dur <= 0:
            continue
        st = _stats(e)
        hlo_op = st.get("hlo_op")
        if need_hlo_op and hlo_op is None:
            continue
        start = float(e.start_ns)
        out.append({"name": e.name, "hlo_op": None if hlo_op is None else str(hlo_op),
                    "module": None if st.get("hlo_module") is None else str(st["hlo_module"]),
                    "start": start, "end": start + dur})
    return out


def _self_times(events: list[dict]) -> None:
    """Set e['self'] = duration less the time of events nested in it on the same line."""
    events.sort(key=lambda e: (e["start"], -e["end"]))
    stack: list[dict] = []
    for e in events:
        e["self"] = e["end"] - e["start"]
        while stack and stack[-1]["end"] <= e["start"]:
            stack.pop()
        if stack:
            parent = stack[-1]
            parent["self"] -= min(e["end"], parent["end"]) - e["start"]
        stack.append(e)


def _span_and_gaps(events: list[dict]) -> tuple[float, list[float]]:
    """(last end - first start, the idle gaps between the merged busy intervals), in ns."""
    if not events:
        return 0.0, []
    events = sorted(events, key=lambda e: e["start"])
    gaps, cur_end = [], events[0]["end"]
    for e in events[1:]:
        if e["start"] > cur_end:
            gaps.append(e["start"] - cur_end)
        cur_end = max(cur_end, e["end"])
    return cur_end - events[0]["start"], gaps


def summarize_events(devices: list[list[list[dict]]], steps: int, top: int) -> dict:
    """Per-step aggregates of the op events (over all devices: per device, averaged)."""
    n_dev = max(len(devices), 1)
    per = n_dev * steps
    events = []
    busy, spans, gaps = [], [], []
    for lines in devices:
        for evs in lines:
            _self_times(evs)
            events += evs
        span, idle = _span_and_gaps([e for evs in lines for e in evs])
        busy.append(span - sum(idle))  # the union of the op intervals
        spans.append(span)
        gaps += idle
    total_self = sum(e["self"] for e in events)

    def table(key) -> list[dict]:
        acc: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, None])
        for e in events:
            k = key(e)
            if k is None:
                continue
            a = acc[k]
            a[0] += e["self"]
            a[1] += 1
            if a[2] is None and e["hlo_op"] and e["hlo_op"] != e["name"]:
                a[2] = e["hlo_op"]
        rows = sorted(acc.items(), key=lambda kv: -kv[1][0])
        out = []
        for name, (ns, calls, hlo_op) in rows[:top]:
            row = {"name": _trunc(name), "ms_per_step": common._r(ns / per / 1e6, 4),
                   "calls_per_step": common._r(calls / per, 2),
                   "share": common._r(ns / total_self, 4) if total_self else None}
            if hlo_op and key is by_name:
                row["hlo_op"] = _trunc(hlo_op)
            out.append(row)
        return out

    def by_name(e):
        return e["name"]

    result = {"device_busy_ms_per_step": common._r(np.mean(busy) / steps / 1e6, 4) if busy
              else None,
              # first op start to last op end, and the idle stretches in between: time the
              # device waited inside the traced steps (launches, updates, host syncs)
              "span_ms_per_step": common._r(np.mean(spans) / steps / 1e6, 4) if spans else None,
              "largest_gaps_ms": [common._r(g / 1e6, 4) for g in sorted(gaps)[::-1][:8]],
              "gaps_over_50us_ms_per_step": common._r(
                  sum(g for g in gaps if g > 5e4) / n_dev / steps / 1e6, 4),
              "op_ms_per_step": common._r(total_self / per / 1e6, 4),
              "num_devices": len(devices), "num_events": len(events),
              "top": table(by_name)}
    if any(e["hlo_op"] and e["hlo_op"] != e["name"] for e in events):
        result["top_by_hlo_op"] = table(lambda e: e["hlo_op"] or e["name"])
    if any(e["module"] for e in events):
        result["programs"] = table(lambda e: e["module"] or "?")[:10]
    return result


def parse_trace(folder: str, platform: str, steps: int, top: int) -> dict:
    import jax

    paths = sorted(Path(folder).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise RuntimeError(f"no .xplane.pb under {folder}")
    profile = jax.profiler.ProfileData.from_file(str(paths[-1]))
    with warnings.catch_warnings():  # iterating event stats warns (a nanobind iterator type)
        warnings.simplefilter("ignore", DeprecationWarning)
        devices, where = select_events(profile, platform)
    out = {"trace_source": where, "trace_planes": [p.name for p in profile.planes]}
    out.update(summarize_events(devices, steps, top))
    if platform != "cpu":  # what the host threads did meanwhile (launches, graph updates, waits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            host = [[_line_events(ln, need_hlo_op=False) for ln in p.lines
                     if ln.name not in DERIVED_LINES and ln.name != "python"]
                    for p in profile.planes if p.name == "/host:CPU"]
        if host and any(host[0]):
            out["host_top"] = summarize_events(host[:1], steps, top)["top"]
    if not out["num_events"]:
        out["profile_error"] = "the trace holds no op events (see trace_source, trace_planes)"
    return out


# -- the engine --------------------------------------------------------------------------------


def _counters(engine) -> dict:
    runner = engine.runner
    holder = getattr(runner, "counters", runner)
    out = {k: getattr(holder, k, None) for k in ("steps", "host_seconds", "device_seconds")}
    out["compile_seconds"] = float(getattr(runner, "compile_seconds", 0.0)
                                   + getattr(runner, "background_compile_seconds", 0.0))
    return out


def _generated(engine) -> int:
    """Output tokens the engine has sampled so far."""
    return engine.num_generation_tokens


def _drain(engine) -> None:
    """Wait for the step in flight (its output KV cache is the last thing it writes)."""
    import jax

    kv = getattr(engine.runner, "kv", None)
    if kv is not None:
        jax.block_until_ready(kv)
    else:
        jax.effects_barrier()


def profile_batch(llm, batch: int, args, params, trace_root: str) -> dict:
    import jax

    engine = llm.llm_engine
    rng = np.random.default_rng(args.seed * 7919 + batch)
    ids = [f"step_profile-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = rng.integers(0, engine.vocab_size, size=args.context).tolist()
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    out: dict[str, Any] = {"batch_size": batch}
    try:
        # prefill: until every request has its first token
        started, prefill_steps, t0 = set(), 0, time.perf_counter()
        limit = batch * args.context + 64
        while len(started) < batch:
            for o in engine.step():
                if o.outputs and len(o.outputs[0].token_ids) > 0:
                    started.add(o.request_id)
            prefill_steps += 1
            if prefill_steps > limit or not engine.has_unfinished_requests():
                raise RuntimeError(f"prefill of batch {batch} did not finish "
                                   f"({len(started)} of {batch} started)")
        out["prefill_steps"] = prefill_steps
        out["prefill_s"] = common._r(time.perf_counter() - t0)
        running = len(getattr(engine.scheduler, "running", ()) or ()) or batch
        if running != batch:
            out["warning"] = f"{running} requests running, not {batch} (KV cache too small?)"

        # no compilation in the background beside the timed steps (it would take the host's
        # time, and on a GPU the device's: its compiler times kernels there)
        engine.wait_for_compiles()
        # warm-up: at least --warmup-steps, then until a step compiles nothing, here or in
        # the background (a step that meets a missing program runs on a larger one while
        # its own compiles)
        warm = 0
        while True:
            before = _counters(engine)["compile_seconds"]
            engine.step()
            engine.wait_for_compiles()
            warm += 1
            compiled = _counters(engine)["compile_seconds"] > before
            if warm >= args.warmup_steps and not compiled or warm >= args.warmup_steps + 20:
                break
        out["warmup_steps"] = warm

        # timed, without the profiler: the steady pipeline, nothing drained. A call of the
        # engine may run several decode steps (multi-step decoding): every figure is per
        # decode step, counted from the tokens generated.
        c0, t0, g0 = _counters(engine), time.perf_counter(), _generated(engine)
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - t0
        c1 = _counters(engine)
        decode_steps = (_generated(engine) - g0) / batch
        if not decode_steps:
            raise RuntimeError(f"the {args.steps} timed steps generated no token")
        out["decode_steps_per_call"] = common._r(decode_steps / args.steps, 3)
        out["wall_ms_per_step"] = common._r(wall / decode_steps * 1e3, 4)
        n = (c1["steps"] - c0["steps"]) if isinstance(c1["steps"], int) else None
        for key, name in (("host_seconds", "runner_host_ms_per_step"),
                          ("device_seconds", "runner_device_ms_per_step")):
            ok = n and isinstance(c1[key], (int, float)) and isinstance(c0[key], (int, float))
            out[name] = common._r((c1[key] - c0[key]) / decode_steps * 1e3, 4) if ok else None
        out["compile_s_in_timed_steps"] = common._r(c1["compile_seconds"] - c0["compile_seconds"])
        out["tokens_per_s"] = common._r(batch * decode_steps / wall, 1)

        if args.no_profile:
            return out
        # profiled: the device drained before and after, so the trace holds exactly these steps
        try:
            folder = tempfile.mkdtemp(prefix=f"b{batch}_", dir=trace_root)
            options = jax.profiler.ProfileOptions()
            for name, value in (("python_tracer_level", 0),  # Python calls: slow, not wanted
                                ("enable_hlo_proto", False)):
                try:
                    setattr(options, name, value)
                except (AttributeError, TypeError):
                    pass
            _drain(engine)
            c0, t0, g0 = _counters(engine), time.perf_counter(), _generated(engine)
            with jax.profiler.trace(folder, profiler_options=options):
                for _ in range(args.steps):
                    engine.step()
                _drain(engine)
                traced = time.perf_counter() - t0
            # the step in flight when the window closed is in the trace, not yet counted
            decode_steps = max((_generated(engine) - g0) / batch, 1.0)
            out["profiled_wall_ms_per_step"] = common._r(traced / decode_steps * 1e3, 4)
            compiled = _counters(engine)["compile_seconds"] - c0["compile_seconds"]
            out["compile_s_in_profiled_steps"] = common._r(compiled)
            if compiled > 0:
                out["warning"] = "a step compiled inside the trace: its op times are not steady"
            t0 = time.perf_counter()
            out.update(parse_trace(folder, jax.devices()[0].platform, decode_steps, args.top))
            out["parse_s"] = common._r(time.perf_counter() - t0)
            if args.keep_trace:
                out["trace_dir"] = folder
        except Exception as e:  # noqa: BLE001 - the timings above still count
            out["profile_error"] = f"{type(e).__name__}: {e}"[:2000]
            out.setdefault("device_busy_ms_per_step", None)
            out.setdefault("top", [])
        return out
    finally:
        engine.abort_request(ids)
        while engine.has_unfinished_requests():  # nothing should be left; be sure
            engine.step()


# -- the run -----------------------------------------------------------------------------------


def check_model_len(args, calls: int, steps_per_call: int) -> None:
    """The requests must outlive `calls` engine steps of up to `steps_per_call` decode steps
    each (the warm-up, up to 20 more steps while one compiles, both windows)."""
    needed = args.context + calls * steps_per_call
    if needed > args.max_model_len:
        raise ValueError(f"--context {args.context} plus the decode steps needs "
                         f"max_model_len >= {needed}; raise --max-model-len")


def run(args) -> dict:
    from jaxvllm import SamplingParams

    try:
        batches = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes: comma-separated integers, got {args.batch_sizes!r}")
    if not batches or min(batches) < 1 or args.steps < 1 or args.context < 1:
        raise ValueError("--batch-sizes, --steps and --context must be >= 1")
    calls = args.warmup_steps + 20 + 2 * args.steps + 2
    check_model_len(args, calls, args.num_scheduler_steps or 1)
    if args.max_num_seqs is None:
        args.max_num_seqs = max(batches)
    elif args.max_num_seqs < max(batches):
        raise ValueError(f"--max-num-seqs {args.max_num_seqs} < batch size {max(batches)}")

    start = time.perf_counter()
    llm = common.build_llm(args)
    load_s = time.perf_counter() - start
    engine = llm.llm_engine
    check_model_len(args, calls, engine.runner.num_scheduler_steps)
    params = SamplingParams(max_tokens=args.max_model_len - args.context, ignore_eos=True,
                            temperature=1.0, top_p=1.0)
    result = {"benchmark": "step_profile", **common.describe_model(llm),
              "workload": {"batch_sizes": batches, "context": args.context, "steps": args.steps,
                           "warmup_steps": args.warmup_steps,
                           "max_model_len": args.max_model_len,
                           "attention_backend": args.attention_backend},
              "xla_flags": os.environ.get("XLA_FLAGS"),
              "load_s": common._r(load_s), "per_batch": {}}
    keep = args.keep_trace
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="jaxvllm_step_profile_")
    try:
        for batch in batches:
            print(f"batch {batch}: prefill {batch} x {args.context} tokens, then "
                  f"{args.steps} timed + {args.steps} profiled decode steps ...", file=sys.stderr)
            try:
                res = profile_batch(llm, batch, args, params, keep or tmp.name)
            except Exception as e:  # noqa: BLE001 - the other batch sizes may still run
                res = {"batch_size": batch, "error": f"{type(e).__name__}: {e}"[:2000]}
            result["per_batch"][str(batch)] = res
            report_batch(result, res, args.top)
    finally:
        if tmp is not None:
            tmp.cleanup()
    try:
        stats = engine.stats()
        result["engine"] = {"num_compiled_programs": stats.get("num_compiled_programs"),
                            "compile_seconds": common._r(stats.get("compile_seconds")),
                            "num_blocks": stats.get("num_blocks"),
                            "block_size": getattr(engine.config, "block_size", None)}
    except Exception as e:  # noqa: BLE001
        result["engine"] = {"error": f"{type(e).__name__}: {e}"}
    result["total_s"] = common._r(time.perf_counter() - start)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2, default=str))
    common.emit_json(result)
    return result


def report_batch(result: dict, res: dict, top: int) -> None:
    b = res["batch_size"]
    rows = [("Model", result["model"]), ("Device", result["device"]), ("Dtype", result["dtype"])]
    if "error" in res:
        common.print_table(f"Step profile, batch {b}", rows + [("Error", res["error"])])
        return
    rows += [("Decode batch x context", f"{b} x {result['workload']['context']}"),
             ("Wall ms per step (unprofiled)", res.get("wall_ms_per_step")),
             ("Runner host ms per step", res.get("runner_host_ms_per_step")),
             ("Runner device ms per step", res.get("runner_device_ms_per_step")),
             ("Wall ms per step (profiled)", res.get("profiled_wall_ms_per_step")),
             ("Device busy ms per step (trace)", res.get("device_busy_ms_per_step")),
             ("Op self time ms per step (trace)", res.get("op_ms_per_step")),
             ("Op events per step", common._r(res["num_events"] / res["num_devices"]
                                               / result["workload"]["steps"], 1)
              if res.get("num_events") else None)]
    if res.get("warning"):
        rows.append(("Warning", res["warning"]))
    if res.get("profile_error"):
        rows.append(("Profile error", res["profile_error"][:300]))
    common.print_table(f"Step profile, batch {b}", rows)
    if res.get("largest_gaps_ms"):
        print(f"-- device idle inside the traced steps (batch {b}): span "
              f"{res.get('span_ms_per_step')} ms/step, gaps over 50 us "
              f"{res.get('gaps_over_50us_ms_per_step')} ms/step, largest "
              f"{res['largest_gaps_ms'][:5]} ms")
    for title, key in (("top ops by name", "top"), ("top HLO ops", "top_by_hlo_op"),
                       ("XLA programs", "programs"), ("host events", "host_top")):
        table = res.get(key)
        if not table:
            continue
        print(f"-- {title} (batch {b}) --")
        print(f"{'ms/step':>10} {'calls/step':>10} {'share':>7}  name")
        for row in table[:top]:
            share = "" if row["share"] is None else f"{100 * row['share']:6.2f}%"
            print(f"{row['ms_per_step']:>10.4f} {row['calls_per_step']:>10.2f} {share:>7}  "
                  f"{row['name']}")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.disable_command_buffers:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()
    return common.run_or_exit("step_profile", run, args)


if __name__ == "__main__":
    main()
    sys.exit(0)
