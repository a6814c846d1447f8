"""Latency of one fixed batch, as `vllm bench latency`: warm-up iterations, then timed ones.

    python benchmarks/latency.py --batch-size 8 --input-len 32 --output-len 128
    python benchmarks/latency.py --batch-size 1 --input-len 128 --output-len 128 --compare-hf
    python benchmarks/latency.py --batch-size 1 --temperature 0 --compare-xla
    python benchmarks/latency.py --cold-start       # LLM(...) to first token, cold and warm
    jaxvllm bench latency ...                       # the same

Every iteration generates for a new batch of random prompts of the same shape (so the prefix
cache cannot shorten the prefill of later iterations). Reported: the mean end-to-end latency
and its percentiles (10, 25, 50, 75, 90, 99), the time to the batch's first token, and the
decode step time (the steps after the first token, compiling steps left out; an engine call
that runs K decode steps, multi-step decoding, counts as K steps of a K-th of its time),
which is the time per output token of a request. `--compare-hf` times HF transformers
`generate` on the same prompts (prefill alone, then the full length) and prints the ratios;
`--compare-xla` the plain-XLA baseline (`benchmarks/xla_baseline.py`: plain JAX, a
contiguous cache, no paging, greedy) on the same batches, after the engine is dropped. `--cold-start` runs
three fresh processes against an empty persistent compilation cache: the first is a cold
start, the second a warm one (the cache the first filled), the third warm with JAX's cache
alone (`JAXVLLM_PROGRAM_CACHE=0`: every program traced and lowered before its lookup). The
last line is one JSON object.
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
import json
import os
import subprocess
import tempfile
import time

import numpy as np

from benchmarks import common
from benchmarks.datasets import random_requests
from benchmarks.throughput import _host_device

PERCENTILES = (10, 25, 50, 75, 90, 99)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser_from_doc("jaxvllm bench latency", __doc__)
    common.add_engine_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--input-len", type=int, default=32)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (vLLM's benchmark uses 1.0; 0 = greedy)")
    g.add_argument("--num-iters-warmup", type=int, default=10)
    g.add_argument("--num-iters", type=int, default=30)
    g.add_argument("--compare-hf", action="store_true",
                   help="also time HF transformers generate on the same batches")
    g.add_argument("--hf-num-iters", type=int, default=3, help="timed HF iterations")
    g.add_argument("--compare-xla", action="store_true",
                   help="also time the plain-XLA baseline (contiguous cache, greedy) on the "
                        "same batches")
    g.add_argument("--cold-start", action="store_true",
                   help="also measure LLM(...) to first token in fresh processes, cold and warm")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="draw the figures here")
    g.add_argument("--output-json", default=None, help="also write the JSON object to this file")
    g.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    return p


def _batch(args, vocab_size: int, iteration: int) -> list[list[int]]:
    reqs = random_requests(args.batch_size, args.input_len, args.output_len, 0.0, vocab_size,
                           seed=args.seed * 100003 + 1_000_000 + iteration)
    return [r.prompt_token_ids for r in reqs]


def _first_token(args, vocab_size: int) -> dict:
    """In this (fresh) process: LLM(...) then one batch to its first token."""
    from jaxvllm import SamplingParams

    cache = common.compilation_cache_state()
    origin = time.perf_counter()
    llm = common.build_llm(args)
    load_s = time.perf_counter() - origin
    params = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=1)
    with common.StepProbe(llm.llm_engine, origin) as probe:
        llm.generate([{"prompt_token_ids": p} for p in _batch(args, vocab_size, -1)], params,
                     use_tqdm=False)
    stats = llm.llm_engine.stats()
    return {"first_token_s": common._r(probe.first_token_s), "load_s": common._r(load_s),
            "num_compiled_programs": stats["num_compiled_programs"],
            "compile_seconds": common._r(stats["compile_seconds"]),
            "program_cache_hits": stats["program_cache_hits"],
            "compilation_cache_entries_before": cache["compilation_cache_entries"]}


def cold_start(argv: list[str]) -> dict:
    """Fresh processes sharing an empty persistent compilation cache: cold, warm, then warm
    with JAX's cache alone (the program cache off)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="jaxvllm_cold_start_") as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        env.pop("JAXVLLM_PROGRAM_CACHE", None)
        for name in ("cold", "warm", "warm_xla_cache_only"):
            if name == "warm_xla_cache_only":
                env["JAXVLLM_PROGRAM_CACHE"] = "0"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                                   "--cold-start-child"], env=env, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if not lines or not lines[-1].startswith("{"):
                raise RuntimeError(f"the {name} start process failed:\n{proc.stderr[-3000:]}")
            child = json.loads(lines[-1])
            child["process_s"] = common._r(time.perf_counter() - start)
            if proc.returncode != 0:  # measured, then failed on the way out: kept, and said
                child["exit_code"] = proc.returncode
                print(f"the {name} start process exited with {proc.returncode} after its "
                      f"result: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            out[name] = child
    return out


def run(args, argv: list[str]) -> dict:
    from jaxvllm import SamplingParams

    if args.num_iters < 1 or args.batch_size < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError("--num-iters, --batch-size, --input-len and --output-len must be >= 1")
    info = common.workload_model_info(args.model, args.tokenizer)
    vocab = info["vocab_size"]
    common.check_fits(random_requests(1, args.input_len, args.output_len, 0.0, vocab),
                      args.max_model_len or info["max_position_embeddings"] or 1 << 30)
    if args.cold_start_child:
        result = _first_token(args, vocab)
        print(json.dumps(result))
        return result

    # Fresh processes and the baseline first: on a GPU, before this process's JAX takes memory.
    cold = cold_start([a for a in argv if a != "--cold-start"]) if args.cold_start else None
    hf = None
    if args.compare_hf:
        print("HF transformers generate ...", file=sys.stderr)
        hf = hf_latency(args, vocab)

    cache = common.compilation_cache_state()
    origin = time.perf_counter()
    llm = common.build_llm(args)
    load_s = time.perf_counter() - origin
    engine = llm.llm_engine
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=1.0, ignore_eos=True,
                            max_tokens=args.output_len)

    first_token_s = None

    def iteration(i: int):
        """One batch; the first of the run also dates LLM(...) to its first token."""
        nonlocal first_token_s
        prompts = [{"prompt_token_ids": p} for p in _batch(args, vocab, i)]
        with common.StepProbe(engine, origin) as probe:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        if first_token_s is None:
            first_token_s = probe.first_token_s
        ttft = probe.first_token_at - start if probe.first_token_at is not None else None
        return seconds, ttft, probe

    for i in range(args.num_iters_warmup):
        iteration(-2 - i)
    # programs the warm-up met missing compile in the background while its steps ran on
    # larger ones; the timed iterations run on their own, as a served engine's steps would
    engine.wait_for_compiles()
    before = engine.stats()
    latencies, ttfts, decode_ms, probes = [], [], [], []
    for i in range(args.num_iters):
        seconds, ttft, probe = iteration(i)
        latencies.append(seconds)
        ttfts.append(ttft)
        decode_ms += _decode_steps_ms(probe, args.batch_size * args.n)
        probes.append(probe)

    r = common._r
    lat = np.asarray(latencies)
    out_tokens = args.batch_size * args.n * args.output_len
    result = {"benchmark": "latency", **common.describe_model(llm),
              "workload": {"batch_size": args.batch_size, "input_len": args.input_len,
                           "output_len": args.output_len, "n": args.n,
                           "num_iters_warmup": args.num_iters_warmup,
                           "num_iters": args.num_iters, "temperature": args.temperature},
              "avg_latency": r(lat.mean(), 4),
              "latencies": [r(x, 4) for x in latencies],
              "percentiles": {str(p): r(np.percentile(lat, p), 4) for p in PERCENTILES},
              **common.summarize([t * 1e3 for t in ttfts if t is not None], (50, 99),
                                 "ttft_", "_ms"),
              **common.summarize(decode_ms, (50, 99), "decode_step_", "_ms"),
              "output_tokens_per_second": r(out_tokens / lat.mean(), 2),
              "load_s": r(load_s), "first_token_s": r(first_token_s), **cache,
              "engine": common.engine_stats(llm, before),
              "steps": _merge_summaries(probes)}
    if cold:
        result["cold_start"] = cold
    if args.compare_xla:
        del llm, engine  # the baseline gets the device memory the engine held
        print("plain-XLA baseline ...", file=sys.stderr)
        result["xla"] = xla_latency(args, vocab)
    for name, base in (("hf", hf), ("xla", result.get("xla"))):
        if base:
            result[name] = base
            result[f"ratio_latency_{name}_over_jaxvllm"] = common.ratio(
                base["avg_latency"], result["avg_latency"])
            result[f"ratio_decode_step_{name}_over_jaxvllm"] = common.ratio(
                base["decode_step_ms"], result["decode_step_median_ms"])
    report(result)
    if args.plot:
        result["plot"] = plot(args.plot, result, probes)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2, default=str))
    common.emit_json(result)
    return result


def _decode_steps_ms(probe, rows: int) -> list[float]:
    """ms per decode step (one token a row) of the engine calls after the batch's first
    token, without compiling ones: a call that gave each of the `rows` rows K tokens (a
    multi-step decode) counts as K steps of a K-th of its time each."""
    seen = False
    out = []
    for s in probe.steps:
        if seen and s.new_tokens and s.compile_s == 0:
            steps = max(round(s.new_tokens / rows), 1)
            out += [s.seconds * 1e3 / steps] * steps
        seen = seen or s.new_tokens > 0
    return out


def _merge_summaries(probes) -> dict:
    merged = common.StepProbe.__new__(common.StepProbe)
    merged.steps = [s for p in probes for s in p.steps]
    return common.StepProbe.summary(merged)


def hf_latency(args, vocab: int) -> dict:
    """HF generate on the same batches: prefill alone (one new token), then the full length;
    the decode step is the difference over the remaining tokens."""
    baseline = common.HFBaseline(args.model, args.dtype, log=lambda m: print(m, file=sys.stderr))
    try:
        iters = max(1, args.hf_num_iters)
        batches = [[p for p in _batch(args, vocab, i) for _ in range(args.n)]
                   for i in range(iters)]
        prefill = [baseline.time_generate(b, 1, args.temperature) for b in batches]
        full = [baseline.time_generate(b, args.output_len, args.temperature) for b in batches]
    finally:
        baseline.close()
    r = common._r
    step = (np.mean(full) - np.mean(prefill)) / max(args.output_len - 1, 1)
    return {"avg_latency": r(np.mean(full), 4), "latencies": [r(x, 4) for x in full],
            "prefill_s": r(np.mean(prefill), 4), "decode_step_ms": r(step * 1e3),
            "num_iters": iters, "load_s": r(baseline.load_s), "device": baseline.device,
            "dtype": baseline.dtype,
            "output_tokens_per_second": r(len(batches[0]) * args.output_len / np.mean(full), 2)}


def xla_latency(args, vocab: int) -> dict:
    """The plain-XLA baseline on the timed iterations' batches (n copies of each prompt),
    after one untimed batch that compiles it."""
    import gc

    from benchmarks.xla_baseline import PlainXLADecoder
    from jaxvllm.models.loader import load_model

    gc.collect()
    start = time.perf_counter()
    decoder = PlainXLADecoder(load_model(args.model, dtype=args.dtype).model,
                              args.input_len + args.output_len)
    load_s = time.perf_counter() - start
    batch = lambda i: [p for p in _batch(args, vocab, i) for _ in range(args.n)]
    decoder.generate(batch(-1), args.output_len)
    runs = [decoder.generate(batch(i), args.output_len) for i in range(args.num_iters)]
    r = common._r
    seconds = [run["seconds"] for run in runs]
    steps_ms = [(run["seconds"] - run["prefill_s"]) * 1e3 / max(args.output_len - 1, 1)
                for run in runs]
    return {"avg_latency": r(np.mean(seconds), 4), "latencies": [r(x, 4) for x in seconds],
            "prefill_s": r(np.mean([run["prefill_s"] for run in runs]), 4),
            "decode_step_ms": r(float(np.median(steps_ms))), "num_iters": len(runs),
            "load_s": r(load_s), "greedy": True,
            "output_tokens_per_second": r(len(batch(0)) * args.output_len / np.mean(seconds), 2)}


def report(res: dict) -> None:
    w, e = res["workload"], res["engine"]
    rows = [("Model", res["model"]), ("Device", res["device"]), ("Dtype", res["dtype"]),
            ("Batch", f"{w['batch_size']} x n={w['n']}, {w['input_len']} in / "
                      f"{w['output_len']} out"),
            ("Iterations (warm-up + timed)", f"{w['num_iters_warmup']} + {w['num_iters']}"),
            ("-- jaxvllm LLM.generate --", None),
            ("Avg latency (s)", res["avg_latency"])]
    rows += [(f"{p}% percentile latency (s)", v) for p, v in res["percentiles"].items()]
    rows += [("Time to first token, mean (ms)", res["ttft_mean_ms"]),
             ("Decode step, median (ms)", res["decode_step_median_ms"]),
             ("Decode step, p99 (ms)", res["decode_step_p99_ms"]),
             ("Output tokens/s", res["output_tokens_per_second"]),
             ("-- engine --", None),
             ("LLM(...) construction (s)", res["load_s"]),
             ("LLM(...) to first token (s)", res["first_token_s"]),
             ("Compiled programs / compile seconds", f"{e['num_compiled_programs']} / "
                                                     f"{e['compile_seconds']:.2f}"),
             ("Padding waste (padded / real tokens)", res["steps"].get("padding_waste")),
             ("Runner host / device ms per step", _host_device(res["steps"]))]
    cold = res.get("cold_start")
    if cold:
        rows += [("-- fresh processes, LLM(...) to first token --", None),
                 ("Cold compilation cache (s)", cold["cold"]["first_token_s"]),
                 ("Warm compilation cache (s)", cold["warm"]["first_token_s"]),
                 ("Warm, JAX's cache alone (s)", cold["warm_xla_cache_only"]["first_token_s"]),
                 ("Compile seconds, cold / warm / JAX's cache alone",
                  " / ".join(str(cold[k]["compile_seconds"]) for k in cold)),
                 ("Programs loaded from the program cache, warm", cold["warm"]["program_cache_hits"])]
    baselines = (("hf", "HF transformers generate", "HF"),
                 ("xla", "plain-XLA baseline (contiguous cache, greedy)", "plain XLA"))
    for name, title, short in baselines:
        base = res.get(name)
        if base:
            rows += [(f"-- {title} --", None),
                     ("Avg latency (s)", base["avg_latency"]),
                     ("Prefill (s)", base["prefill_s"]),
                     ("Decode step (ms)", base["decode_step_ms"]),
                     (f"-- ratio {short} / jaxvllm (higher: jaxvllm faster) --", None),
                     ("Latency", res[f"ratio_latency_{name}_over_jaxvllm"]),
                     ("Decode step", res[f"ratio_decode_step_{name}_over_jaxvllm"])]
    common.print_table("Latency", rows)


def plot(path: str, res: dict, probes) -> str:
    def cdf(ax):
        common.plot_cdf(ax, res["latencies"], "jaxvllm", "end-to-end latency of the batch (s)")
        if res.get("hf"):
            common.plot_cdf(ax, res["hf"]["latencies"], "HF generate",
                            "end-to-end latency of the batch (s)")

    def steps(ax):
        for i, probe in enumerate(probes[:5]):
            ax.plot([s.seconds * 1e3 for s in probe.steps], label=f"iteration {i}", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)

    w = res["workload"]
    return common.save_plot(path, [("latency CDF", cdf), ("step times", steps)],
                            f"latency: {res['model']} on {res['device']} ({res['dtype']}), "
                            f"batch {w['batch_size']}, {w['input_len']} in / {w['output_len']} out")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return common.run_or_exit("latency", run, args, argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
