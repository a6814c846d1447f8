"""`jaxvllm bench NAME ...` (throughput, latency, serve, sampler, cpu_attention, host_overhead,
kernel_count, decode_kernel, small_batch_matmul, decode_layer): the benchmarks of
`benchmarks/`, with the same flags as `python benchmarks/<name>.py` (`jaxvllm bench NAME
--help`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {"throughput": "offline LLM.generate over a dataset (requests/s, tokens/s)",
              "latency": "one fixed batch: warm-up, then timed iterations",
              "serve": "streaming client against an OpenAI-compatible server (TTFT, TPOT, ITL)",
              "sampler": "the engine's sampler against jax.random.categorical / jnp.argmax",
              "cpu_attention": "the native CPU attention against XLA's block pairs and jnp",
              "host_overhead": "a decode batch's host time per step, multi-step calls "
                               "pipelined against in order",
              "kernel_count": "kernels per decode step, compiled for an H100 without one",
              "decode_kernel": "the fused decode kernel's configurations against the "
                               "separate KV write and attention",
              "small_batch_matmul": "the small-batch projection kernels' tilings against "
                                    "XLA on a decoder layer's projections",
              "decode_layer": "whole decoder layers of a decode step as one kernel against "
                              "XLA's projections and the small-batch kernels"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run a benchmark (throughput, latency, serve, sampler, cpu_attention, "
                      "host_overhead, kernel_count, decode_kernel, small_batch_matmul, "
                      "decode_layer)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a benchmark. Every benchmark prints a table, then one JSON line.\n\n"
                    + "\n".join(f"  {name:<18} {text}" for name, text in BENCHMARKS.items()),
        epilog="examples:\n"
               "  jaxvllm bench throughput --dataset random --num-prompts 64 --input-len 128 "
               "--output-len 128 --range-ratio 0.75 --compare-hf\n"
               "  jaxvllm bench latency --batch-size 1 --input-len 128 --output-len 128\n"
               "  jaxvllm bench serve --base-url http://localhost:8000 --request-rate 4\n"
               "  jaxvllm bench sampler --rows 1,64 --vocab-size 151936\n"
               "  jaxvllm bench cpu_attention --dtype bfloat16\n"
               "  jaxvllm bench throughput --help")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK",
                   help=", ".join(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="the benchmark's own flags")
    p.set_defaults(func=run)


def _import(name: str):
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
    # not installed as a package: a source checkout has it beside jaxvllm/
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "__init__.py").is_file():
        raise ValueError("the benchmarks package is not installed; run from a source checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{name}")


def run(args) -> int:
    _import(args.benchmark).main(list(args.args))
    return 0
