"""The host's share of a decode batch: where a step's Python time goes, and what pipelining
multi-step calls saves against collecting each call before scheduling the next.

    python benchmarks/host_overhead.py                        # a tiny random model, 8 steps a call
    python benchmarks/host_overhead.py --model /tmp/qwen-0.5b --dtype bfloat16   # on a GPU
    jaxvllm bench host_overhead ...                           # the same

One engine per mode, one after the other (the second with the first's KV cache size), runs
the same batches (`--num-prompts` random prompts of `--input-len` tokens, `--output-len`
tokens each, ignore_eos, temperature 0.6), the first to compile: `pipelined` (the default:
a multi-step call scheduled and dispatched before the one in flight is collected) and
`in_order` (`async_scheduling=False`). The second batch is timed: output tok/s, wall ms per
engine step, and per step the host's time in scheduling, building and launching the step
(the runner), folding its tokens into the scheduler, and the outputs (detokenizing, stop
strings); `wait` is the time `step()` spent waiting for the device (also for the step left
in flight when the batch ends). With no `--model` a tiny random model (2 layers, hidden
size 64, vocabulary 2,048) keeps the device's share small, so that the host's shows. The
ratio pipelined / in order is the gain; on a CPU, whose cores also run the steps, expect
little. The last line is one JSON object.
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
import gc
import tempfile
import time

import numpy as np

from benchmarks import common, random_model

MODES = {"pipelined": None, "in_order": False}  # -> async_scheduling
PARTS = ("schedule", "runner", "fold_in", "outputs", "wait")


def build_parser() -> argparse.ArgumentParser:
    p = common.parser_from_doc("jaxvllm bench host_overhead", __doc__)
    common.add_engine_args(p)
    p.set_defaults(num_scheduler_steps=8, max_num_seqs=256, max_model_len=512,
                   max_num_batched_tokens=8192)
    g = p.add_argument_group("run")
    g.add_argument("--num-prompts", type=int, default=256)
    g.add_argument("--input-len", type=int, default=32)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--output-json", default=None, help="also write the JSON object to this file")
    return p


class _PartTimer:
    """Wall time spent in some of the engine's methods, by part (wrapped on the instances)."""

    def __init__(self, engine):
        self.seconds: collections.Counter = collections.Counter()
        self._wrapped: list[tuple[object, str]] = []
        scheduler = engine.scheduler
        self._wrap(engine, "_schedule_ahead", "schedule")
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(engine, "_dispatch", "runner")
        self._wrap(scheduler, "update_from_output", "fold_in")
        self._wrap(engine, "_process", "outputs")
        self._wrap(engine, "_collect", "collect")

    def _wrap(self, obj, name: str, part: str) -> None:
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(obj, name, timed)
        self._wrapped.append((obj, name))

    def restore(self) -> None:
        """Unwrap (the wrappers hold the engine's bound methods: a reference cycle)."""
        for obj, name in self._wrapped:
            delattr(obj, name)
        self._wrapped.clear()

    def per_step_ms(self, steps: int) -> dict:
        parts = dict(self.seconds)
        # _collect = waiting for the device + folding in
        parts["wait"] = parts.pop("collect", 0.0) - parts.get("fold_in", 0.0)
        return {p: round(1000 * parts.get(p, 0.0) / max(steps, 1), 3) for p in PARTS}


def _model(args, tmp: str) -> tuple[str, str]:
    if args.model is not None:
        return args.model, args.dtype
    path = random_model.build("tiny-qwen2", Path(tmp) / "model", dtype="float32")
    return str(path), "float32"


def run(args) -> dict:
    from jaxvllm import LLM, SamplingParams

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.async_scheduling is not None:
        raise ValueError("--async-scheduling: this benchmark runs both modes itself")
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.6)
    with tempfile.TemporaryDirectory() as tmp:
        model, dtype = _model(args, tmp)
        kwargs = {**common.engine_kwargs(args), "dtype": dtype}
        results, prompts = {}, None
        for mode, async_scheduling in MODES.items():
            llm = LLM(model, **kwargs, async_scheduling=async_scheduling)
            # on a GPU the next engine could not size its cache from free memory (the peak
            # counts this one's): it gets the same number of blocks
            kwargs.setdefault("num_gpu_blocks_override", llm.llm_engine.num_blocks)
            if prompts is None:
                vocab = llm.llm_engine.vocab_size
                prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input_len).tolist()}
                           for _ in range(2 * args.num_prompts)]
            llm.generate(prompts[:args.num_prompts], params, use_tqdm=False)  # compiles
            engine = llm.llm_engine
            timer = _PartTimer(engine)
            before = engine.stats()
            start = time.perf_counter()
            outputs = llm.generate(prompts[args.num_prompts:], params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            after = engine.stats()
            timer.restore()
            steps = after["steps"] - before["steps"]
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            results[mode] = {
                "output_tokens": tokens, "output_tokens_per_second": round(tokens / elapsed, 2),
                "elapsed_time": round(elapsed, 4), "engine_steps": steps,
                "multi_step_calls": after["multi_steps"] - before["multi_steps"],
                "steps_scheduled_ahead": (after["steps_scheduled_ahead"]
                                          - before["steps_scheduled_ahead"]),
                "wall_ms_per_step": round(1000 * elapsed / max(steps, 1), 3),
                "host_ms_per_step": timer.per_step_ms(steps),
                "compile_seconds_in_run": round(after["compile_seconds"]
                                                - before["compile_seconds"], 3)}
            del llm, engine, outputs
            gc.collect()  # the engine's device memory, before the next one is built
    return {"benchmark": "host_overhead", "model": args.model or "random tiny-qwen2",
            "device": common.device_name(), "num_scheduler_steps": args.num_scheduler_steps,
            "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                         "output_len": args.output_len},
            **results,
            "ratio_pipelined_vs_in_order": common.ratio(
                results["pipelined"]["output_tokens_per_second"],
                results["in_order"]["output_tokens_per_second"])}


def print_table(result: dict) -> None:
    rows = [("Output tokens/s", "output_tokens_per_second"),
            ("Engine steps (multi-step calls)", None), ("Wall ms per step", "wall_ms_per_step")]
    print(f"{'':34}{'pipelined':>14}{'in order':>14}")
    for label, key in rows:
        if key is None:
            cells = [f"{r['engine_steps']} ({r['multi_step_calls']})"
                     for r in (result["pipelined"], result["in_order"])]
        else:
            cells = [str(result[m][key]) for m in MODES]
        print(f"{label:34}{cells[0]:>14}{cells[1]:>14}")
    for part in PARTS:
        cells = [str(result[m]["host_ms_per_step"][part]) for m in MODES]
        print(f"{'  ms per step: ' + part:34}{cells[0]:>14}{cells[1]:>14}")
    print(f"Pipelined / in order: {result['ratio_pipelined_vs_in_order']}x "
          f"({result['device']}, {result['num_scheduler_steps']} steps a call)")


def main(argv=None) -> dict:
    def run_and_print(args):
        result = run(args)
        print_table(result)
        return result

    return common.main_with_json("host_overhead", build_parser(), run_and_print, argv)


if __name__ == "__main__":
    main()
