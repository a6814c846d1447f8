"""The fused decode kernel's configurations on the engine's decode shapes, against the KV write
and the attention as separate kernels, in one run.

    python benchmarks/decode_kernel.py                    # rows 1, 64, 256 x contexts 512-2048
    python benchmarks/decode_kernel.py --rows 1 --contexts 640 --splits 1,4,16 --block-k 64
    python benchmarks/decode_kernel.py --rows 256 --contexts 2048 --spread 0.95 \
        --split-keys 512,1024 --splits auto,1,2    # rows of 102-2,048 keys: key ranges
    python benchmarks/decode_kernel.py --smoke             # tiny shapes, interpret mode (CPU)
    jaxvllm bench decode_kernel ...                        # the same

A shape is `rows` requests of `context` keys each (their new token's included; with
`--spread f`, each row's count uniform in [(1 - f) * context, context], as in a batch of
requests at all stages), one new token a row, padded as the engine pads a multi-step decode (to a power of two, at least 16
rows; padding rows have seq_len 0), in Qwen2.5-0.5B's attention geometry by default (14 query
heads, 2 KV heads, head dim 64; `--heads`, `--kv-heads`, `--head-dim`), block size 16,
bfloat16, each request's blocks at random places. Timed per shape:

- `separate`: the XLA scatter KV write, then the `triton` variant's ragged attention kernel
  (a decode step as the engine runs it with `pallas_triton+kv_scatter`, as before the fused
  kernel);
- `default`: `decode_attention_triton` as the engine calls it (its `default_tiling`);
- every combination of `--block-k`, `--splits` (programs sharing a row's keys, merged by a
  second kernel; `auto` = its default for the shape and block_k) or `--split-keys` (each
  program a fixed range of that many keys), `--num-warps` and `--num-stages`.

Each runs `--iters` times in one jitted loop over the layers of a stacked cache, carried as
the model carries it, compiled with jaxvllm's XLA flags (the loop recorded as one CUDA
graph, as a decode step's), so the time per call includes the gaps between kernels as the
engine has them. Reports ms per call, the effective KV bandwidth (K and V bytes of
every request's context / time) and each configuration's ratio to `separate` and to the
default configuration; then the best per shape. The last line is one JSON object.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402

import jaxvllm  # noqa: E402,F401 - its XLA flags (CUDA graphs for loops), before jax starts
from benchmarks import common  # noqa: E402

LAYERS = 2
MAX_PROGRAMS = 2048  # explicit splits beyond this many programs are not tried


def build_parser():
    p = common.parser_from_doc("decode_kernel.py", __doc__)
    p.add_argument("--rows", type=common.int_list, default=[1, 64, 256])
    p.add_argument("--contexts", type=common.int_list, default=[512, 1024, 2048])
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-k", type=common.int_list, default=[32, 64, 128])
    p.add_argument("--splits", default="auto,1,2,4,8,16",
                   help="comma-separated; 'auto': the kernel's default for the shape")
    p.add_argument("--split-keys", type=common.int_list, default=[],
                   help="key ranges a split to try too (multiples of the block_k tried)")
    p.add_argument("--spread", type=float, default=0.0,
                   help="rows' key counts uniform in [(1 - spread) * context, context]")
    p.add_argument("--num-warps", type=common.int_list, default=[4])
    p.add_argument("--num-stages", type=common.int_list, default=[2])
    common.add_sweep_args(p, iters=100)
    return p


def padded_rows(rows: int) -> int:
    """The rows a multi-step decode of `rows` requests runs padded to (the engine's decode
    buckets on a GPU: powers of two from 16)."""
    return max(16, 1 << (rows - 1).bit_length())


def row_contexts(rows: int, context: int, spread: float, seed: int = 0) -> np.ndarray:
    """Each row's key count: `context`, or with `spread` uniform in [(1 - spread) * context,
    context] (the longest row at `context`)."""
    if not 0 <= spread < 1:
        raise ValueError(f"--spread {spread}: from 0 up to (not including) 1")
    lo = max(1, int(round(context * (1 - spread))))
    contexts = np.random.default_rng(seed + 1).integers(lo, context + 1, rows)
    contexts[0] = context
    return contexts.astype(np.int32)


def make_inputs(rows: int, context: int, args, seed: int = 0):
    """(qkv, k_cache, v_cache, seq_lens, block_tables, slot_mapping) for `rows` requests of
    `row_contexts` keys, each new token's slot at its last position."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    bs = args.block_size
    T = padded_rows(rows)
    contexts = row_contexts(rows, context, args.spread, seed)
    per_row = -(-contexts // bs)
    width = 1 << (int(per_row.max()) - 1).bit_length()  # table widths are bucketed too
    num_blocks = 1 + int(per_row.sum())
    tables = np.zeros((T, width), np.int32)
    free = iter(rng.permutation(np.arange(1, num_blocks)))
    for r, n in enumerate(per_row):
        tables[r, :n] = [next(free) for _ in range(n)]
    seq_lens = np.zeros(T, np.int32)
    seq_lens[:rows] = contexts
    pos = contexts - 1
    slots = np.zeros(T, np.int32)
    slots[:rows] = tables[np.arange(rows), pos // bs] * bs + pos % bs
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    cache_shape = (LAYERS, num_blocks, bs, args.kv_heads, args.head_dim)
    qkv = jax.random.normal(kq, (T, args.heads + 2 * args.kv_heads, args.head_dim), dtype)
    return (qkv, jax.random.normal(kk, cache_shape, dtype),
            jax.random.normal(kv, cache_shape, dtype), jnp.asarray(seq_lens),
            jnp.asarray(tables), jnp.asarray(slots))


def _separate(qkv, k_cache, v_cache, layer, seq_lens, tables, slots, *, scale, num_kv_heads):
    """The engine's decode step without the fused kernel: `attend` with the scatter KV
    writer named, so the XLA scatter write and then the ragged Triton attention."""
    import jax.numpy as jnp

    from jaxvllm.models.attention import AttentionMetadata, KVCache, attend
    from pallas_kernels.decode_attention_triton import split_qkv

    q, k, v = split_qkv(qkv, num_kv_heads)
    # one query token a request; padding rows (seq_len 0) have none
    qsl = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(seq_lens > 0, dtype=jnp.int32)])
    meta = AttentionMetadata(qsl, seq_lens, tables, slots, decode_only=True)
    out, kv = attend(q, k, v, KVCache(k_cache, v_cache), layer, meta, scale=scale,
                     sliding_window=None, backend="pallas_triton+kv_scatter")
    return out, kv.k, kv.v


def looped(step, iters: int):
    """`step(qkv, k, v, layer, seq_lens, tables, slots) -> (out, k, v)` run `iters` times in
    one jitted loop, layer i % LAYERS, caches carried and donated."""
    import jax
    from jax import lax

    def run(qkv, k_cache, v_cache, seq_lens, tables, slots):
        def body(i, carry):
            _, k, v = carry
            return step(qkv, k, v, i % LAYERS, seq_lens, tables, slots)

        out = jax.numpy.zeros(qkv.shape[:1] + (qkv.shape[1] - 2 * k_cache.shape[3],
                                               qkv.shape[2]), qkv.dtype)
        return lax.fori_loop(0, iters, body, (out, k_cache, v_cache))

    return jax.jit(run, donate_argnums=(1, 2))


def configurations(args, programs_per_split: int):
    """(label, kernel keywords) of every fused configuration asked for; explicit splits
    that would make over MAX_PROGRAMS programs are left out."""
    splits = [None if s == "auto" else int(s) for s in args.splits.split(",") if s]
    splits = [s for s in splits if s is None or s * programs_per_split <= MAX_PROGRAMS]
    for bk, s, w, st in itertools.product(args.block_k, splits, args.num_warps,
                                          args.num_stages):
        label = f"bk{bk} s{'auto' if s is None else s} w{w} st{st}"
        yield label, dict(block_k=bk, num_splits=s, num_warps=w, num_stages=st)
    for bk, keys, w, st in itertools.product(args.block_k, args.split_keys, args.num_warps,
                                             args.num_stages):
        if keys % bk == 0:
            yield (f"bk{bk} keys{keys} w{w} st{st}",
                   dict(block_k=bk, split_keys=keys, num_warps=w, num_stages=st))


def time_loop(fn, inputs, reps: int, iters: int):
    """(the first run's output, best of `reps` further runs in ms per call) of the jitted
    loop, the caches threaded through."""
    import jax

    qkv, k, v, *meta = inputs
    first, k, v = fn(qkv, k, v, *meta)
    first = np.asarray(first, np.float32)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out, k, v = fn(qkv, k, v, *meta)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    inputs[1], inputs[2] = k, v
    return first, best / iters * 1e3


def bench_shape(rows: int, context: int, args) -> dict:
    from jaxvllm import xla_flags
    from pallas_kernels.decode_attention_triton import (
        decode_attention_reference,
        decode_attention_triton,
        default_tiling,
    )

    interpret = True if args.smoke else None
    scale = args.head_dim ** -0.5
    inputs = list(make_inputs(rows, context, args))
    common_kw = dict(scale=scale, num_kv_heads=args.kv_heads)
    # a loop's output is its last call's: layer (iters - 1) % LAYERS
    want = np.asarray(decode_attention_reference(
        inputs[0], inputs[1], inputs[2], (args.iters - 1) % LAYERS, *inputs[3:],
        **common_kw)[0], np.float32)
    keys = int(np.asarray(inputs[3]).sum())  # every row's keys
    kv_bytes = keys * args.kv_heads * args.head_dim * 2 * inputs[1].dtype.itemsize
    T, width = inputs[0].shape[0], inputs[4].shape[1]
    result = {"rows": rows, "padded_rows": T, "context": context, "spread": args.spread,
              "mean_context": round(keys / rows, 1), "table_width": width,
              "default_tiling": default_tiling(T, args.kv_heads, width * args.block_size),
              "default_splits": {bk: default_tiling(T, args.kv_heads, width * args.block_size,
                                                    bk)[1] for bk in args.block_k},
              "results": {}}
    candidates = [("separate", functools.partial(_separate, **common_kw)),
                  ("default", functools.partial(decode_attention_triton, interpret=interpret,
                                                **common_kw))]
    candidates += [(label, functools.partial(decode_attention_triton, interpret=interpret,
                                             **common_kw, **kw))
                   for label, kw in configurations(args, T * args.kv_heads)]

    def compile_loop(step):
        return looped(step, args.iters).lower(*inputs).compile(
            compiler_options=xla_flags.step_compiler_options())

    # compiled side by side (most of the time on a GPU), then timed one at a time
    with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
        compiled = {label: pool.submit(compile_loop, step) for label, step in candidates}
    for label, future in compiled.items():
        try:
            got, ms = time_loop(future.result(), inputs, args.reps, args.iters)
            err = float(np.max(np.abs(got - want)))
            result["results"][label] = {"ms": common._r(ms, 4), "max_abs_err": common._r(err, 6),
                                        "kv_tb_per_s": common._r(kv_bytes / (ms * 1e-3) / 1e12)}
            if err > 0.05:
                result["results"][label]["error"] = f"output differs from the reference by {err}"
        except Exception as e:  # noqa: BLE001 - a configuration that fails is reported
            result["results"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
        # a donated cache may be gone after a failure: fresh inputs for the next
        if inputs[1].is_deleted():
            inputs = list(make_inputs(rows, context, args))
    ok = {k: r for k, r in result["results"].items() if "error" not in r and k != "separate"}
    base = result["results"].get("separate", {}).get("ms")
    default = result["results"].get("default", {}).get("ms")
    for r in result["results"].values():
        if "ms" in r:
            r["vs_separate"] = common.ratio(base, r["ms"])
            r["vs_default"] = common.ratio(default, r["ms"])
    if ok:
        result["best"] = min(ok, key=lambda k: ok[k]["ms"])
    return result


def run(args) -> dict:
    if args.smoke:
        args.rows, args.contexts, args.iters, args.reps = [1, 3], [40], 2, 1
        args.heads, args.kv_heads, args.head_dim = 4, 2, 16
        args.block_k, args.splits, args.split_keys = [16], "1,4", [16]
    shapes = []
    for rows, context in itertools.product(args.rows, args.contexts):
        r = bench_shape(rows, context, args)
        shapes.append(r)
        print(f"-- {rows} rows (padded to {r['padded_rows']}) x context {context} "
              f"(mean {r['mean_context']}; table width {r['table_width']}) --")
        common.print_sweep(r["results"], [
            ("ms", "ms", 9, ".4f"), ("kv_tb_per_s", "TB/s", 7, ".3f"),
            ("vs_separate", "vs separate", 12, ""), ("vs_default", "vs default", 11, "")])
        print(f"   best: {r.get('best')}; default = block_k, splits, split_keys "
              f"{tuple(r['default_tiling'])}", flush=True)
    return {"benchmark": "decode_kernel", "device": common.device_name(),
            "geometry": {"heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim, "block_size": args.block_size},
            "iters": args.iters, "shapes": shapes}


def main(argv=None) -> dict:
    return common.main_with_json("decode_kernel", build_parser(), run, argv)


if __name__ == "__main__":
    main()
