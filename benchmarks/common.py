"""What every benchmark shares: engine flags, a per-step probe of the engine, statistics,
the Hugging Face transformers baseline, the printed table, the closing JSON line and plots.

The contract of every benchmark's output: a readable table first, then, as the very last
line, one JSON object with all figures (model, device, dtype, workload, each metric, ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxvllm.entrypoints.serve_cmd import (ATTENTION_BACKEND_HELP, ENGINE_OPTIONS,
                                           add_engine_switches)

# -- the machine, the model, the caches ------------------------------------------------------


def device_name() -> str:
    """'cpu (2 cores)' or 'gpu: NVIDIA H100 80GB HBM3' (x count when there are several)."""
    import jax

    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    count = f" x{len(devices)}" if len(devices) > 1 else ""
    return f"{d.platform}: {getattr(d, 'device_kind', '?')}{count}"


def compilation_cache_state() -> dict:
    """The persistent compilation cache an engine will use, and how many programs it holds
    already (0 = a cold start, more = warm)."""
    import jax

    from jaxvllm.cache import cache_dir

    folder = jax.config.jax_compilation_cache_dir
    if not folder and os.environ.get("JAXVLLM_COMPILATION_CACHE", "1") != "0":
        folder = str(cache_dir() / "xla")
    if not folder:
        return {"compilation_cache_dir": None, "compilation_cache_entries": 0}
    path = Path(folder)
    entries = sum(1 for p in path.iterdir() if p.is_file()) if path.is_dir() else 0
    return {"compilation_cache_dir": str(path), "compilation_cache_entries": entries}


def parser_from_doc(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: `doc`'s first paragraph as the description, the rest (usage
    examples, what it measures) as the epilog, printed as written."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers."""
    return [int(x) for x in text.split(",") if x]


def add_sweep_args(parser: argparse.ArgumentParser, iters: int) -> None:
    """The timing and output flags of a kernel sweep (decode_kernel.py, small_batch_matmul.py):
    calls per timed loop, loops, compile threads, --smoke, --output-json."""
    parser.add_argument("--iters", type=int, default=iters, help="calls per timed loop")
    parser.add_argument("--reps", type=int, default=3, help="timed loops; the best is kept")
    parser.add_argument("--compile-threads", type=int, default=8)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and iterations, kernels interpreted (runs on CPU)")
    parser.add_argument("--output-json")


def print_sweep(results: dict, columns: Sequence[tuple[str, str, int, str]],
                width: int = 22) -> None:
    """One line per configuration of a kernel sweep: its label, then each column (result key,
    header, width, format spec; "" formats a ratio as `_fmt` does), or its error."""
    print(f"   {'configuration':<{width}}" + "".join(f" {h:>{w}}" for _, h, w, _ in columns))
    for label, r in results.items():
        if "error" in r:
            print(f"   {label:<{width}} error: {r['error'][:80]}")
            continue
        print(f"   {label:<{width}}" + "".join(
            f" {format(r[key], spec) if spec else _fmt(r[key]):>{w}}"
            for key, _, w, spec in columns))


def random_layers(shapes: dict, num_layers: int, dtype, seed: int = 0,
                  scales: Sequence[str] = ("_norm", "_scale")) -> list[dict]:
    """`num_layers` dicts of random weights of `shapes` ({name: shape}): norm scales (names
    ending in one of `scales`) near 1, the rest normal with variance 1 / their first
    dimension (a projection's fan-in), each layer from its own key (seed + layer)."""
    import jax

    layers = []
    for layer in range(num_layers):
        keys = jax.random.split(jax.random.key(seed + layer), len(shapes))
        layers.append({
            name: (1 + 0.1 * jax.random.normal(key, shape, dtype)
                   if name.endswith(tuple(scales))
                   else jax.random.normal(key, shape, dtype) * shape[0] ** -0.5)
            for key, (name, shape) in zip(keys, shapes.items())})
    return layers


def time_against_first(ways, compile_loop: Callable, one_output: Callable, operands,
                       args, *, layers_a_call: int, weight_bytes: int) -> dict:
    """Each `(label, layer)` of `ways` timed against the first (XLA's way): compiled side by
    side (`compile_loop(layer)`, most of the time on a GPU), its output (`one_output(layer)`)
    checked against the first's, then each compiled loop called on `operands`, taking turns
    (`jaxvllm.engine.autotune.fastest_each`, `args.reps` times). A call runs
    `layers_a_call` layers of `weight_bytes` each. {"results": {label: {us_per_layer,
    rel_err, weight_tb_per_s, vs_xla} or {error}}, "best": the fastest label but the
    first}."""
    import concurrent.futures

    import jax

    from jaxvllm.engine import autotune

    want = one_output(ways[0][1])
    result = {"weight_mb_per_layer": round(weight_bytes / 1e6, 2), "results": {}}
    with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
        compiled = {label: pool.submit(compile_loop, layer) for label, layer in ways}
    runnable = {}  # label -> (compiled loop, difference from the first's output)
    for label, layer in ways:
        try:
            got = one_output(layer)
            err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))
            fn = compiled[label].result()
            jax.block_until_ready(fn(*operands))
            runnable[label] = fn, err
        except Exception as e:  # noqa: BLE001 - a way that fails is reported
            result["results"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
    seconds = autotune.fastest_each([fn for fn, _ in runnable.values()], operands, args.reps)
    for (label, (_, err)), s in zip(runnable.items(), seconds):
        us = 1e6 * s / layers_a_call
        result["results"][label] = {
            "us_per_layer": _r(us, 2), "rel_err": _r(err, 5),
            "weight_tb_per_s": _r(weight_bytes / (us * 1e-6) / 1e12)}
        if err > 0.05:
            result["results"][label]["error"] = f"output differs from XLA's by {err:.3g}"
    first = ways[0][0]
    base = result["results"].get(first, {}).get("us_per_layer")
    for r in result["results"].values():
        if "us_per_layer" in r:
            r["vs_xla"] = ratio(base, r["us_per_layer"])
    ok = {k: r for k, r in result["results"].items() if "error" not in r and k != first}
    if ok:
        result["best"] = min(ok, key=lambda k: ok[k]["us_per_layer"])
    return result


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's engine flags (those jaxvllm has); unset ones keep the engine's defaults."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder, Hub id, .gguf file or converted checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--tensor-parallel-size", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--attention-backend", default=None, help=ATTENTION_BACKEND_HELP)
    add_engine_switches(g)  # --wait-for-precompile among them: counted in LLM(...) time
    g.add_argument("--seed", type=int, default=0)


_ENGINE_FLAGS = ("tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                 "block_size", "gpu_memory_utilization", "num_gpu_blocks_override",
                 "enable_prefix_caching", "attention_backend", "seed", "tensor_parallel_size",
                 "kv_cache_dtype", *ENGINE_OPTIONS)


def engine_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k, None) is not None}


def build_llm(args):
    """`LLM(...)` from the engine flags."""
    from jaxvllm import LLM

    return LLM(args.model, **engine_kwargs(args))


def workload_model_info(model: Optional[str], tokenizer: Optional[str] = None,
                        need_tokenizer: bool = False) -> dict:
    """What a workload needs from the model before any engine is built (so that a baseline can
    run first, and `LLM(...)` to first token is timed alone): vocab size, context length and,
    if asked, the tokenizer. Reads configs and GGUF metadata only; no weights, no device."""
    from jaxvllm.models.loader import read_hf_config, source_config_and_weights
    from jaxvllm.models.source import resolve_model

    source = resolve_model(model)
    if source.kind == "converted":
        config = read_hf_config(source.path)
    else:
        config, _ = source_config_and_weights(source)  # the weights stream stays unread
    tok = None
    if need_tokenizer:
        from jaxvllm.tokenizer import load_tokenizer

        tok = load_tokenizer(source, tokenizer)
    return {"vocab_size": int(config["vocab_size"]),
            "max_position_embeddings": config.get("max_position_embeddings"),
            "tokenizer": tok, "source_kind": source.kind}


def describe_model(llm) -> dict:
    from jaxvllm.models.config import dtype_name

    engine = llm.llm_engine
    return {"model": engine.loaded.source.name, "device": device_name(),
            "dtype": dtype_name(engine.loaded.dtype)}


def check_fits(requests, max_model_len: int) -> None:
    too_long = [r for r in requests if r.prompt_len + r.expected_output_len > max_model_len]
    if too_long:
        r = too_long[0]
        raise ValueError(f"{len(too_long)} request(s) exceed max_model_len={max_model_len} "
                         f"(e.g. {r.prompt_len} prompt + {r.expected_output_len} output tokens); "
                         f"raise --max-model-len or shorten the workload")


# -- the engine, step by step ----------------------------------------------------------------


@dataclasses.dataclass
class StepRecord:
    start: float
    end: float
    running: int  # requests holding KV blocks after the step
    new_tokens: int  # output tokens the step produced
    kv_stored: int  # tokens whose KV is in the cache, over the running requests
    kv_slots: int  # token slots of the blocks those requests hold
    kv_usage: float  # fraction of the cache's blocks in use
    compile_s: float = 0.0  # compilation of new step programs inside this step
    # deltas of the runner's counters over the step, where it has them
    real_tokens: Optional[int] = None
    padded_tokens: Optional[int] = None
    host_seconds: Optional[float] = None
    device_seconds: Optional[float] = None
    multi_steps: Optional[int] = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


RUNNER_COUNTERS = ("real_tokens", "padded_tokens", "host_seconds", "device_seconds",
                   "multi_steps")


class StepProbe:
    """Wraps `engine.step` of one engine instance while active and records every step:
    duration, output tokens produced, KV utilization (tokens stored / slots in the blocks
    the running requests hold, as benchmarks/kv_utilization.py), block usage, and the
    runner's cumulative counters (`real_tokens`, `padded_tokens`, `host_seconds`,
    `device_seconds`, on `runner.counters` or the runner itself) where it has them.

    `origin` (a perf_counter time, e.g. taken just before `LLM(...)`) dates the first
    generated token: `first_token_s` is the time from it to the end of the first step that
    produced a token.
    """

    def __init__(self, engine, origin: Optional[float] = None):
        self.engine = engine
        self.origin = origin
        self.steps: list[StepRecord] = []
        self.first_token_at: Optional[float] = None
        self._block_size = engine.config.block_size

    def _counters(self) -> dict:
        runner = self.engine.runner
        holder = getattr(runner, "counters", runner)
        return {name: getattr(holder, name) for name in RUNNER_COUNTERS
                if isinstance(getattr(holder, name, None), (int, float))}

    def __enter__(self) -> "StepProbe":
        inner = self.engine.step  # the bound method
        probe = self

        def step():
            before = probe._counters(), probe._compile_seconds()
            generated = probe.engine.num_generation_tokens
            start = time.perf_counter()
            outputs = inner()
            end = time.perf_counter()
            probe._record(start, end, generated, before)
            return outputs

        self.engine.step = step
        return self

    def _compile_seconds(self) -> float:
        return float(getattr(self.engine.runner, "compile_seconds", 0.0))

    def __exit__(self, *exc) -> None:
        self.engine.__dict__.pop("step", None)
        self.engine = None  # the records stay; the engine (and its device memory) can go

    def _record(self, start, end, generated_before, before) -> None:
        # counted by the engine: step() returns no output of a running request that asked
        # for final outputs only (LLM.generate)
        new = self.engine.num_generation_tokens - generated_before
        if new and self.first_token_at is None:
            self.first_token_at = end
        live = [r for r in self.engine.scheduler.running if r.block_ids]
        (counters, compiled), after = before, self._counters()
        deltas = {k: after[k] - counters[k] for k in after if k in counters}
        self.steps.append(StepRecord(
            start, end, len(live), new, sum(r.num_computed_tokens for r in live),
            sum(len(r.block_ids) for r in live) * self._block_size,
            float(self.engine.kv_manager.usage), self._compile_seconds() - compiled,
            **deltas))

    @property
    def first_token_s(self) -> Optional[float]:
        if self.first_token_at is None or self.origin is None:
            return None
        return self.first_token_at - self.origin

    def summary(self) -> dict:
        """Aggregates over the recorded steps (what goes into the JSON line)."""
        steps = self.steps
        if not steps:
            return {"num_steps": 0}
        stored = sum(s.kv_stored for s in steps)
        slots = sum(s.kv_slots for s in steps)
        ms = [s.seconds * 1e3 for s in steps]
        warm = [s.seconds * 1e3 for s in steps if s.compile_s == 0] or [float("nan")]
        out = {"num_steps": len(steps), "step_ms_mean": _r(np.mean(ms)),
               "step_ms_median": _r(np.median(ms)), "step_ms_max": _r(max(ms)),
               "steps_compiling": sum(1 for s in steps if s.compile_s > 0),
               "step_ms_mean_excl_compile": _r(np.mean(warm)),
               "kv_utilization": _r(stored / slots, 4) if slots else None,
               "kv_cache_usage_peak": _r(max(s.kv_usage for s in steps), 4),
               "running_requests_mean": _r(np.mean([s.running for s in steps]), 2),
               "running_requests_max": max(s.running for s in steps)}
        if all(s.real_tokens is not None and s.padded_tokens is not None for s in steps):
            real = sum(s.real_tokens for s in steps)
            padded = sum(s.padded_tokens for s in steps)
            per_step = [s.padded_tokens / s.real_tokens for s in steps if s.real_tokens]
            out.update(real_tokens=real, padded_tokens=padded,
                       padding_waste=_r(padded / real, 4) if real else None,
                       padding_waste_step_mean=_r(np.mean(per_step), 4) if per_step else None,
                       by_token_bucket=_by_token_bucket(steps))
        else:
            out.update(real_tokens=None, padded_tokens=None, padding_waste=None,
                       padding_waste_note="the runner has no real_tokens/padded_tokens counters")
        timed = [s for s in steps if s.host_seconds is not None and s.device_seconds is not None
                 and s.compile_s == 0]
        if timed:
            out.update(host_ms_per_step=_r(1e3 * np.mean([s.host_seconds for s in timed])),
                       device_ms_per_step=_r(1e3 * np.mean([s.device_seconds for s in timed])),
                       engine_overhead_ms_per_step=_r(1e3 * np.mean(
                           [s.seconds - s.host_seconds - s.device_seconds for s in timed])))
        return out


def _by_token_bucket(steps) -> dict:
    """Where the time went, by the token count the steps were padded to (real + padded;
    multi-step decode calls apart, as "N multi-step", N = rows x steps): steps, seconds and
    real tokens each, over the steps that compiled nothing; and per step, the runner's host
    and device ms (where it counts them) and the mean context of the requests running
    after it."""
    out: dict[str, dict] = {}
    for s in steps:
        if s.compile_s or not s.real_tokens:
            continue
        label = str(s.real_tokens + s.padded_tokens) + (" multi-step" if s.multi_steps else "")
        entry = out.setdefault(label,
                               {"steps": 0, "seconds": 0.0, "real_tokens": 0, "host": 0.0,
                                "device": 0.0, "context": 0.0})
        entry["steps"] += 1
        entry["seconds"] += s.seconds
        entry["real_tokens"] += s.real_tokens
        entry["host"] += s.host_seconds or 0.0
        entry["device"] += s.device_seconds or 0.0
        entry["context"] += s.kv_stored / max(s.running, 1)
    return {k: {"steps": v["steps"], "seconds": _r(v["seconds"]),
                "real_tokens": v["real_tokens"],
                "host_ms_per_step": _r(v["host"] / v["steps"] * 1e3),
                "device_ms_per_step": _r(v["device"] / v["steps"] * 1e3),
                "mean_context": _r(v["context"] / v["steps"], 1)}
            for k, v in sorted(out.items(), key=lambda kv: (int(kv[0].split()[0]), kv[0]))}


def engine_stats(llm, before: Optional[dict] = None) -> dict:
    """`LLMEngine.stats()`, plus what the run since `before` (its stats then) added to the
    compile count and time, on the steps' path and in background threads (a compilation
    beside the steps takes the host's time, and on a GPU the device's)."""
    before = before or {}
    stats = dict(llm.llm_engine.stats())
    out = {k: (_r(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}
    for key, name in (("compile_seconds", "compile_seconds_in_run"),
                      ("background_compile_seconds", "background_compile_seconds_in_run")):
        out[name] = _r(stats.get(key, 0.0) - before.get(key, 0.0))
    out["compiled_in_run"] = (stats.get("num_compiled_programs", 0)
                              - before.get("num_compiled_programs", 0))
    return out


def run_or_exit(name: str, run, *args):
    """`run(*args)`; a ValueError (a bad flag value, dataset or model) ends the benchmark with
    `name: error: ...` instead of a traceback."""
    try:
        return run(*args)
    except ValueError as e:
        raise SystemExit(f"{name}: error: {e}") from None


def main_with_json(name: str, parser: argparse.ArgumentParser, run, argv=None) -> dict:
    """A benchmark's `main`: parse `argv`, `run(args)` (a ValueError exits as a usage
    error), write the result to `--output-json` if given, and print it as the last line."""
    args = parser.parse_args(argv)
    result = run_or_exit(name, run, args)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result) + "\n")
    emit_json(result)
    return result


def time_ms(fn, *args, iters: int, reps: int = 5) -> float:
    """Best of `reps` averages over `iters` back-to-back calls of a jitted `fn` (dispatch
    overlaps a GPU), in milliseconds."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e3


# -- statistics --------------------------------------------------------------------------------


def _r(x, digits: int = 3):
    """Round a float for the JSON line (None and non-finite values pass as None)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def summarize(values: Sequence[float], percentiles: Sequence[float] = (50, 99),
              prefix: str = "", suffix: str = "", digits: int = 3) -> dict:
    """mean, median, std and the percentiles of `values`, named vLLM's way:
    `{prefix}mean{suffix}`, `{prefix}median{suffix}`, `{prefix}p99{suffix}`, ..."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        v = np.zeros(1)
    out = {f"{prefix}mean{suffix}": _r(v.mean(), digits),
           f"{prefix}median{suffix}": _r(np.median(v), digits),
           f"{prefix}std{suffix}": _r(v.std(), digits)}
    for p in percentiles:
        label = f"{p:g}".replace(".", "_")
        out[f"{prefix}p{label}{suffix}"] = _r(np.percentile(v, p), digits)
    return out


def ratio(a: Optional[float], b: Optional[float], digits: int = 2) -> Optional[float]:
    return _r(a / b, digits) if a is not None and b else None


# -- the Hugging Face transformers baseline -----------------------------------------------------


def load_hf_model(model: Optional[str], dtype: str = "float32", device: Optional[str] = None):
    """The same model in transformers (torch): a HF folder or Hub id as is, a GGUF file via
    `from_pretrained(folder, gguf_file=name)` (dequantized). Returns (model, device)."""
    import torch
    import transformers

    from jaxvllm.models.source import resolve_model

    source = resolve_model(model)
    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if source.kind == "gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=torch_dtype)
    elif source.kind == "hf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch_dtype)
    else:
        raise ValueError(f"{source.name}: a converted checkpoint cannot be loaded by transformers; "
                         f"give --model the Hugging Face folder or GGUF file it came from")
    return hf.to(device).eval(), device


def _is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


class HFBaseline:
    """HF transformers `generate` on the same model (torch), loaded once.

    `run` takes prompts as token ids and one output length per prompt: static batches,
    longest outputs first (so each batch pads as little as it can), left padding, every
    sequence forced to its batch's longest output (`min_new_tokens`), only the useful tokens
    (each request's own output length) counted. `batch_size` None means as large as fits:
    all requests at once, halved on an out-of-memory error.
    """

    def __init__(self, model: Optional[str], dtype: str = "auto", device: Optional[str] = None,
                 log: Callable[[str], None] = print):
        import torch

        if dtype == "auto":  # as jaxvllm's "auto": float32 on CPU, bfloat16 on a GPU
            dtype = "bfloat16" if (device or ("cuda" if torch.cuda.is_available() else "cpu")
                                   ).startswith("cuda") else "float32"
        self.dtype, self.log = dtype, log
        start = time.perf_counter()
        self.model, self.device = load_hf_model(model, dtype, device)
        self.load_s = time.perf_counter() - start
        cfg = self.model.generation_config
        self.pad = next((p for p in (self.model.config.pad_token_id, cfg.pad_token_id,
                                     cfg.eos_token_id) if isinstance(p, int)), 0)
        # first-call allocations and kernel selection are not the steady state
        self._generate([[1, 2, 3, 4]], 2, 0.0)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def _generate(self, prompts: Sequence[Sequence[int]], new_tokens: int,
                  temperature: float) -> int:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) \
            if temperature > 0 else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad, **sample)
        self._sync()
        return int(out.shape[1] - width) * len(prompts)

    def run(self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
            batch_size: Optional[int] = None, temperature: float = 0.0) -> dict:
        import torch

        order = sorted(range(len(prompts)), key=lambda i: (output_lens[i], len(prompts[i])),
                       reverse=True)
        size = min(batch_size or len(prompts), len(prompts))
        while True:
            try:
                generated, batches = 0, 0
                start = time.perf_counter()
                for b in range(0, len(order), size):
                    idx = order[b:b + size]
                    generated += self._generate([prompts[i] for i in idx],
                                                max(output_lens[i] for i in idx), temperature)
                    batches += 1
                elapsed = time.perf_counter() - start
                break
            except (RuntimeError, MemoryError) as e:
                if not _is_oom(e) or size == 1 or batch_size is not None:
                    raise
                size = max(1, size // 2)
                self.log(f"(HF generate: out of memory; retrying with batch size {size})")
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        useful = int(sum(output_lens))
        prompt_tokens = int(sum(len(p) for p in prompts))
        return {"elapsed_s": _r(elapsed), "load_s": _r(self.load_s), "batch_size": size,
                "num_batches": batches, "useful_output_tokens": useful,
                "generated_tokens": generated, "prompt_tokens": prompt_tokens,
                "requests_per_s": _r(len(prompts) / elapsed, 4),
                "output_tokens_per_s": _r(useful / elapsed, 2),
                "total_tokens_per_s": _r((useful + prompt_tokens) / elapsed, 2),
                "device": self.device, "dtype": self.dtype}

    def time_generate(self, prompts: Sequence[Sequence[int]], new_tokens: int,
                      temperature: float = 0.0) -> float:
        """Seconds for one `generate` of the whole batch."""
        start = time.perf_counter()
        self._generate(prompts, new_tokens, temperature)
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the model (and, on a GPU, torch's cached memory, before JAX wants it)."""
        import gc

        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def hf_generate(model: Optional[str], prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                *, dtype: str = "auto", batch_size: Optional[int] = None,
                temperature: float = 0.0, device: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict:
    """Load the model in transformers, run the workload once (see `HFBaseline.run`), free it."""
    baseline = HFBaseline(model, dtype, device, log)
    try:
        return baseline.run(prompts, output_lens, batch_size, temperature)
    finally:
        baseline.close()


# -- output: the table, the JSON line, the plot ------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.2f}"
        return f"{value:.4g}"
    return str(value)


def print_table(title: str, rows: Sequence[tuple[str, Any]], width: int = 60,
                file=None) -> None:
    """A titled two-column table; a row whose label starts with '--' is a sub-heading."""
    file = file or sys.stdout
    print(f"{' ' + title + ' ':=^{width}}", file=file)
    for label, value in rows:
        if label.startswith("--"):
            print(f"{' ' + label.strip('- ') + ' ':-^{width}}", file=file)
            continue
        text = _fmt(value)
        print(f"{label:<{max(width - len(text) - 1, len(label))}} {text}", file=file)
    print("=" * width, file=file)


def emit_json(result: dict) -> None:
    """The benchmark's last output line."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


def save_plot(path: str | os.PathLike, panels: Sequence[tuple[str, Callable]],
              title: str = "") -> str:
    """One figure with a panel per (title, draw(ax)) pair, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, (name, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_cdf(ax, values: Sequence[float], label: str, xlabel: str) -> None:
    v = np.sort(np.asarray(list(values), dtype=np.float64))
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def plot_bars(ax, labels: Sequence[str], values: Sequence[Optional[float]], ylabel: str) -> None:
    vals = [v or 0.0 for v in values]
    bars = ax.bar(labels, vals, color=["tab:blue", "tab:orange", "tab:green"][:len(vals)])
    for bar, v in zip(bars, vals):
        ax.annotate(f"{v:,.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)


def step_panels(probe: StepProbe, origin: float) -> list[tuple[str, Callable]]:
    """Per-step figures from a probe: output tokens/s against the running batch, and KV
    utilization and block usage over time."""
    steps = probe.steps

    def throughput_vs_batch(ax):
        sampled = [s for s in steps if s.new_tokens and s.seconds > 0 and s.compile_s == 0]
        ax.scatter([s.new_tokens for s in sampled], [s.new_tokens / s.seconds for s in sampled],
                   s=8, alpha=0.5)
        ax.set_xlabel("requests that sampled a token in the step (steps without compilation)")
        ax.set_ylabel("output tokens/s in the step")

    def kv_over_time(ax):
        t = [s.end - origin for s in steps]
        ax.plot(t, [s.kv_stored / s.kv_slots if s.kv_slots else np.nan for s in steps],
                label="tokens stored / allocated slots")
        ax.plot(t, [s.kv_usage for s in steps], label="blocks in use / all blocks")
        ax.set_xlabel("seconds")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)

    return [("output tokens/s per step vs batch size", throughput_vs_batch),
            ("KV cache over the run", kv_over_time)]
