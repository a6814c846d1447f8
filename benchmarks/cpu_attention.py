"""The CPU attention variants on the same paged cache, one step of every layer at a time.

    python benchmarks/cpu_attention.py               # SmolLM2-135M's attention, float32
    python benchmarks/cpu_attention.py --layers 2 --heads 4 --kv-heads 2 --head-dim 16 --smoke

Each case is one step's ragged batch over a cache of blocks in random order; each variant
runs it for every layer inside one jitted `lax.scan` (as the engine's decoder does, the layer
index traced), so the time is a step's attention:

    native_cpu    the CPU default: native code through XLA's FFI (pallas_kernels/native_cpu.py)
    block_pairs   XLA work items of (query rows, one block), the plan built on the host with
                  numpy as the engine does (pallas_kernels/block_pairs.py)
    reference     plain jnp: each token gathers its request's padded context

It checks both variants' outputs against the reference, and prints milliseconds per step and
the ratios block_pairs / native_cpu and reference / native_cpu (above 1: native is faster).
Prints a table, then as the last line one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import block_pairs, native_cpu
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

# name -> [(context length, query tokens)] per request
CASES = {
    "decode_64x192": [(192, 1)] * 64,
    "decode_16x512": [(512, 1)] * 16,
    "prefill_256": [(256, 256)],
    "mixed_32x256_chunk_128": [(256, 1)] * 32 + [(256, 128)],
}
SMOKE_CASES = {"decode_4x40": [(40, 1)] * 4, "mixed_3x24_chunk_12": [(24, 1)] * 3 + [(20, 12)]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="of the KV cache (queries stay float32, as in a float32 model)")
    p.add_argument("--iters", type=int, default=5, help="calls per timing (best of 5)")
    p.add_argument("--smoke", action="store_true", help="two tiny cases")
    p.add_argument("--output-json", default=None, help="also write the JSON object here")
    return p


def make_step(requests, args, seed: int = 0):
    """q, caches and the step's layout for `requests`, blocks in random order."""
    rng = np.random.default_rng(seed)
    bs = args.block_size
    blocks = [-(-ctx // bs) for ctx, _ in requests]
    num_blocks = 1 + sum(blocks)
    shape = (args.layers, num_blocks, bs, args.kv_heads, args.head_dim)
    dtype = jnp.dtype(args.dtype)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    ids = 1 + rng.permutation(num_blocks - 1)
    tables = np.zeros((len(requests), max(blocks)), np.int32)
    start = 0
    for r, n in enumerate(blocks):
        tables[r, :n] = ids[start:start + n]
        start += n
    seq_lens = np.array([ctx for ctx, _ in requests], np.int32)
    qsl = np.concatenate([[0], np.cumsum([q for _, q in requests])]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(qsl[-1]), args.heads, args.head_dim), np.float32))
    return q, k_cache, v_cache, qsl, seq_lens, tables


def _all_layers(attend, layers: int):
    """A jitted step of `attend(q, k, v, layer, *rest)` over every layer in a scan; returns
    the sum of the layers' outputs (so no layer's work can be dropped)."""
    def step(q, k, v, *rest):
        def body(total, layer):
            return total + attend(q, k, v, layer, *rest).astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(layers))[0]
    return jax.jit(step)


def bench_case(requests, args) -> dict:
    q, k, v, qsl, seq_lens, tables = make_step(requests, args)
    scale = args.head_dim ** -0.5
    num_tokens = q.shape[0]
    plan = block_pairs.host_plan(qsl, seq_lens, tables, num_tokens, args.block_size)
    layout = (jnp.asarray(qsl), jnp.asarray(seq_lens), jnp.asarray(tables))
    runs = {
        "native_cpu": (_all_layers(functools.partial(native_cpu.native_cpu_attention,
                                                     scale=scale), args.layers), layout),
        "block_pairs": (_all_layers(lambda q, k, v, layer, plan: block_pairs.block_pair_attention(
            q, k, v, layer, *layout, scale=scale, plan=plan), args.layers), (plan,)),
        "reference": (_all_layers(functools.partial(ragged_paged_attention_reference,
                                                    scale=scale), args.layers), layout),
    }
    outputs = {name: np.asarray(fn(q, k, v, *extra)) for name, (fn, extra) in runs.items()}
    out = {"requests": len(requests), "tokens": num_tokens,
           "kv_bytes_per_layer": int(2 * sum(seq_lens) * args.kv_heads * args.head_dim
                                     * jnp.dtype(args.dtype).itemsize)}
    for name in ("native_cpu", "block_pairs"):
        err = float(np.abs(outputs[name] - outputs["reference"]).max())
        if err > (1e-3 if args.dtype == "float32" else 5e-2) * args.layers:
            raise RuntimeError(f"{name} differs from the reference by {err}")
        out[f"{name}_max_abs_err"] = err
    for name, (fn, extra) in runs.items():
        out[f"{name}_ms"] = round(common.time_ms(fn, q, k, v, *extra, iters=args.iters), 3)
    for name in ("block_pairs", "reference"):
        out[f"speedup_vs_{name}"] = common.ratio(out[f"{name}_ms"], out["native_cpu_ms"])
    out["native_cpu_gb_per_s"] = round(
        out["kv_bytes_per_layer"] * args.layers / out["native_cpu_ms"] / 1e6, 2)
    return out


def run(args) -> dict:
    if min(args.layers, args.heads, args.kv_heads, args.head_dim, args.iters) < 1 \
            or args.heads % args.kv_heads:
        raise ValueError("--layers, --heads, --kv-heads, --head-dim and --iters must be >= 1, "
                         "and --heads a multiple of --kv-heads")
    reason = native_cpu.unavailable_reason()
    if reason is not None:
        raise ValueError(f"the native CPU kernel is not available: {reason}")
    cases = SMOKE_CASES if args.smoke else CASES
    result = {"benchmark": "cpu_attention", "device": common.device_name(),
              "kv_dtype": args.dtype, "layers": args.layers, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "block_size": args.block_size,
              "cases": {name: bench_case(reqs, args) for name, reqs in cases.items()}}
    table = []
    for name, res in result["cases"].items():
        table.append((f"-- {name} ({res['tokens']} tokens) --", ""))
        table.append(("ms per step: native / block pairs / reference",
                      f"{res['native_cpu_ms']} / {res['block_pairs_ms']} / "
                      f"{res['reference_ms']}"))
        table.append(("speedup vs block pairs / reference",
                      f"{res['speedup_vs_block_pairs']} / {res['speedup_vs_reference']}"))
        table.append(("native: KV GB/s", res["native_cpu_gb_per_s"]))
    common.print_table(f"CPU attention, {args.layers} layers ({result['device']})", table)
    return result


def main(argv=None) -> dict:
    return common.main_with_json("cpu_attention", build_parser(), run, argv)


if __name__ == "__main__":
    main()
