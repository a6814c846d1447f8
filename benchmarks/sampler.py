"""The engine's sampler against jax's own sampling ops, on the same logits in one process.

    python benchmarks/sampler.py                                # [1, 64, 256] x 49152 (SmolLM2)
    python benchmarks/sampler.py --rows 1,256 --vocab-size 151936 --iters 20   # Qwen2.5

Per batch size R it times, jitted, on [R, V] float32 logits:

    random    `sampler.sample`, every row temperature 1.0 and seeded (the engine's path:
              one uniform per row, inverse CDF over blocks of the vocabulary), against
              `jax.random.categorical` of the logits (Gumbel-max, one draw per token)
    greedy    `sampler.sample`, every row temperature 0 (argmax over block maxima), against
              `jnp.argmax`
    kernels   (on a GPU, or with --kernels) `random` with the sampler's Pallas kernels
              (`sample(kernel=True)`, pallas_kernels/sampling.py), against the same
              baseline and against `random`; the share of rows whose token differs from
              `random`'s is reported (float sums in another order: ~0)

and prints each time and the baseline / engine ratio (above 1: the engine is faster). The
engine's processing (penalty / bias / mask shortcuts, temperature) is inside its time; the
baselines do only the draw. Prints a table, then as the last line one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxvllm.engine.sampler import RowSpec, SamplerPaths, build_sampling_metadata, sample


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--rows", default="1,64,256", help="comma-separated batch sizes R")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--iters", type=int, default=10, help="calls per timing (best of 5)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the sampler's kernels (default: on a GPU)")
    p.add_argument("--output-json", default=None, help="also write the JSON object here")
    return p


def _engine_sampler(rows: int, vocab: int, temperature: float, kernel: bool = False):
    """The sampler as the engine's steps run it: its shortcuts decided on the host."""
    specs = [RowSpec(temperature=temperature, seed=i, step_position=7) for i in range(rows)]
    meta, num_logprobs = build_sampling_metadata(specs, vocab, device_put=False)
    paths = SamplerPaths.of(meta)
    fn = jax.jit(lambda logits, meta: sample(logits, meta, num_logprobs=num_logprobs,
                                             paths=paths, kernel=kernel).token_ids)
    return fn, jax.device_put(meta)


def bench_rows(rows: int, vocab: int, iters: int, kernels: bool = False) -> dict:
    logits = jnp.asarray(2.0 * np.random.default_rng(rows).standard_normal((rows, vocab)),
                         jnp.float32)
    keys = jax.random.split(jax.random.key(0), rows)
    categorical = jax.jit(jax.vmap(lambda key, row: jax.random.categorical(key, row)))
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))

    out, samplers = {}, {}
    for name, temperature, baseline, base_args in (
            ("random", 1.0, categorical, (keys, logits)),
            ("greedy", 0.0, argmax, (logits,))):
        fn, meta = samplers[name] = _engine_sampler(rows, vocab, temperature)
        engine_ms = common.time_ms(fn, logits, meta, iters=iters)
        base_ms = common.time_ms(baseline, *base_args, iters=iters)
        out[name] = {"engine_ms": round(engine_ms, 4), "jax_ms": round(base_ms, 4),
                     "speedup": common.ratio(base_ms, engine_ms)}
    if kernels:
        fn, meta = _engine_sampler(rows, vocab, 1.0, kernel=True)
        kernel_ms = common.time_ms(fn, logits, meta, iters=iters)
        xla_fn, xla_meta = samplers["random"]
        differ = float(np.mean(np.asarray(fn(logits, meta))
                               != np.asarray(xla_fn(logits, xla_meta))))
        out["kernels"] = {"engine_ms": round(kernel_ms, 4), "jax_ms": out["random"]["jax_ms"],
                          "speedup": common.ratio(out["random"]["jax_ms"], kernel_ms),
                          "vs_random": common.ratio(out["random"]["engine_ms"], kernel_ms),
                          "tokens_differing": differ}
    greedy_fn, greedy_meta = samplers["greedy"]
    if not np.array_equal(np.asarray(greedy_fn(logits, greedy_meta)), np.asarray(argmax(logits))):
        raise RuntimeError("the engine's greedy tokens differ from jnp.argmax")
    return out


def run(args) -> dict:
    row_counts = [int(r) for r in args.rows.split(",") if r.strip()]
    if not row_counts or min(row_counts) < 1 or args.vocab_size < 2:
        raise ValueError("--rows needs batch sizes >= 1 and --vocab-size >= 2")
    kernels = args.kernels if args.kernels is not None else jax.default_backend() == "gpu"
    result = {"benchmark": "sampler", "device": common.device_name(), "dtype": "float32",
              "vocab_size": args.vocab_size,
              "rows": {str(r): bench_rows(r, args.vocab_size, args.iters, kernels)
                       for r in row_counts}}
    table = []
    for r, res in result["rows"].items():
        table.append((f"-- R = {r} rows x {args.vocab_size} --", ""))
        for name, m in res.items():
            table.append((f"{name}: engine / jax ms", f"{m['engine_ms']:.3f} / {m['jax_ms']:.3f}"))
            table.append((f"{name}: speedup", m["speedup"]))
            if "vs_random" in m:
                table.append((f"{name}: XLA's random / kernels", m["vs_random"]))
    common.print_table(f"Sampler ({result['device']})", table)
    return result


def main(argv=None) -> dict:
    return common.main_with_json("sampler", build_parser(), run, argv)


if __name__ == "__main__":
    main()
