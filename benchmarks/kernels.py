"""Attention kernel benchmark: every registered variant against jax's own ops, in one run.

    python benchmarks/kernels.py                      # the issue's shapes (on a GPU)
    python benchmarks/kernels.py --sweep              # also sweep the Triton knobs
    python benchmarks/kernels.py --only decode_64x1024 --variants triton,mosaic_gpu
    python benchmarks/kernels.py --smoke              # tiny shapes; runs on CPU (interpret)

Per shape it times, in this process and on the same data: each registered kernel variant
(`pallas_kernels/variants.py`; the XLA reference included), jax's own Pallas paged attention
(`jax.experimental.pallas.ops.gpu.paged_attention`, decode only, best of a few configs), and
for prefill `jax.nn.dot_product_attention` with cuDNN and with XLA on the equivalent dense
causal batch. Decode shapes report the effective KV bandwidth (K and V bytes of every
request's context / time), the others TFLOP/s (4 * H * D per visible query-key pair). The
mixed batch is also timed as its decode part and its prefill part run separately (the target:
mixed <= the sum). Then the KV writers (XLA scatter vs the Pallas kernel, cache donated) and
a `lax.scan` over layers with the stacked cache in the carry, as the model runs it (is the
per-layer cost the kernel's, or does the scan add copies?).

Every kernel's output is checked against the reference first (bfloat16 tolerance) where
the reference fits in memory. Prints a table per section; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import time_ms  # noqa: E402
from pallas_kernels.kv_write import KV_WRITERS  # noqa: E402
from pallas_kernels.variants import Case, variants  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
warnings.filterwarnings("ignore", message=".*paged_attention is deprecated.*")

TARGET_DECODE_TBS = 2.4  # 80% of the ~3.0 TB/s copy bandwidth measured on an H100
REFERENCE_MAX_BYTES = 24 << 30  # skip the jnp reference when its [T, S, KVH, D] gather is larger


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # "decode", "prefill" or "mixed"
    heads: int
    kv_heads: int
    head_dim: int
    requests: tuple[tuple[int, int], ...]  # (seq_len, q_len): cached + new, new
    block_size: int = 16

    @property
    def tokens(self) -> int:
        return sum(q for _, q in self.requests)

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * sum(s for s, _ in self.requests) * self.kv_heads * self.head_dim * itemsize

    def flops(self) -> int:
        pairs = sum(q * (s - q) + q * (q + 1) // 2 for s, q in self.requests)
        return 4 * pairs * self.heads * self.head_dim


def _mixed(n_dec, ctx, n_chunks, chunk):
    return ((ctx, 1),) * n_dec + ((ctx, chunk),) * n_chunks


SHAPES = [
    Shape("decode_64x1024", "decode", 32, 8, 128, ((1024, 1),) * 64),
    Shape("decode_256x1024_d64", "decode", 14, 2, 64, ((1024, 1),) * 256),
    Shape("decode_32x4096_d64", "decode", 32, 8, 64, ((4096, 1),) * 32),
    Shape("prefill_8x2048", "prefill", 32, 32, 128, ((2048, 2048),) * 8),
    Shape("mixed_32dec_2x512", "mixed", 32, 8, 128, _mixed(32, 1024, 2, 512)),
]
SMOKE_SHAPES = [
    Shape("decode_smoke", "decode", 4, 2, 64, ((40, 1), (17, 1), (64, 1))),
    Shape("prefill_smoke", "prefill", 4, 4, 16, ((32, 32), (32, 32)), block_size=8),
    Shape("mixed_smoke", "mixed", 4, 2, 16, ((40, 1), (33, 1), (48, 16)), block_size=8),
]
# Triton knob grids for --sweep (each config is one compile)
SWEEP = {
    "decode": [dict(block_k=bk, kv_splits=s, num_warps=w)
               for bk, s, w in itertools.product((32, 64, 128), (1, 2, 4), (4,))]
              + [dict(block_k=64, kv_splits=1, num_warps=8), dict(block_k=128, num_warps=8)],
    "prefill": [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
                for bq, bk, w, st in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
                                      (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 8, 2))],
}
# block_q counts tokens: with 4 query heads per KV head, block_q 16 is already 64 rows
SWEEP["mixed"] = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
                  for bq, bk, w, st in ((8, 64, 4, 2), (16, 64, 4, 3), (32, 64, 8, 2),
                                        (16, 32, 4, 2))]


def make_inputs(shape: Shape, dtype, seed=0, layers=2):
    """Device arrays in the engine's layout: q [T, H, D], stacked caches [L, N, B, KVH, D]
    with every request's blocks in random order, and the metadata."""
    rng = np.random.default_rng(seed)
    bs = shape.block_size
    per_req = [-(-s // bs) for s, _ in shape.requests]
    num_blocks = 1 + sum(per_req)
    max_blocks = max(per_req)
    ids = rng.permutation(np.arange(1, num_blocks)).astype(np.int32)
    tables = np.zeros((len(shape.requests), max_blocks), np.int32)
    at = 0
    for r, n in enumerate(per_req):
        tables[r, :n] = ids[at:at + n]
        at += n
    qsl = np.concatenate([[0], np.cumsum([q for _, q in shape.requests])]).astype(np.int32)
    seq_lens = np.array([s for s, _ in shape.requests], np.int32)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    cache_shape = (layers, num_blocks, bs, shape.kv_heads, shape.head_dim)
    return dict(
        q=jax.random.normal(kq, (shape.tokens, shape.heads, shape.head_dim), dtype),
        k_cache=jax.random.normal(kk, cache_shape, dtype),
        v_cache=jax.random.normal(kv, cache_shape, dtype),
        layer=jnp.int32(layers - 1), query_start_loc=jnp.asarray(qsl),
        seq_lens=jnp.asarray(seq_lens), block_tables=jnp.asarray(tables))


def _attention_args(inp):
    return (inp["q"], inp["k_cache"], inp["v_cache"], inp["layer"], inp["query_start_loc"],
            inp["seq_lens"], inp["block_tables"])


def _reference_bytes(shape: Shape) -> int:
    span = max(-(-s // shape.block_size) for s, _ in shape.requests) * shape.block_size
    return shape.tokens * span * shape.kv_heads * shape.head_dim * 12  # bf16 k, v + f32 copies


def _metric(shape: Shape, ms: float, itemsize: int) -> dict:
    if shape.kind == "decode":
        return {"ms": round(ms, 4), "tb_s": round(shape.kv_bytes(itemsize) / ms / 1e9, 3)}
    return {"ms": round(ms, 4), "tflop_s": round(shape.flops() / ms / 1e9, 1)}


def _jax_paged_attention(shape: Shape, inp, iters, interpret):
    """jax's own Pallas decode op (its own page layout), best of a few configs."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    layer = int(inp["layer"])
    q = inp["q"] * jnp.asarray(shape.head_dim ** -0.5, inp["q"].dtype)  # it does not scale
    k_pages = jnp.transpose(inp["k_cache"][layer], (2, 0, 1, 3))  # [KVH, N, B, D]
    v_pages = jnp.transpose(inp["v_cache"][layer], (2, 0, 1, 3))
    tables = inp["block_tables"]
    pages = tables.shape[1]
    best = None
    for ppcb, splits in ((8, 16), (4, 16), (16, 8), (8, 8), (4, 4)):
        if pages % splits or (pages // splits) % min(ppcb, pages // splits):
            continue
        fn = jax.jit(functools.partial(jax_paged.paged_attention, pages_per_compute_block=ppcb,
                                       k_splits=splits, interpret=interpret))
        try:
            ms = time_ms(fn, q, k_pages, v_pages, tables, inp["seq_lens"], iters=iters)
        except Exception as e:  # noqa: BLE001 - a baseline config that does not run is skipped
            print(f"  jax paged_attention ppcb={ppcb} k_splits={splits}: {type(e).__name__}")
            continue
        if best is None or ms < best[0]:
            best = (ms, dict(pages_per_compute_block=ppcb, k_splits=splits), fn)
    if best is None:
        return None
    out = best[2](q, k_pages, v_pages, tables, inp["seq_lens"])
    return best[0], best[1], out


def _dense_inputs(shape: Shape, inp):
    """The prefill batch as dense [n, S, heads, D] q, k, v (the cache's pages gathered in
    order), for jax.nn.dot_product_attention: all requests of a prefill shape have the same
    length and no cached prefix."""
    n, s = len(shape.requests), shape.requests[0][0]
    layer = int(inp["layer"])

    def dense(cache):
        pages = cache[layer][inp["block_tables"]]  # [n, MB, B, KVH, D]
        return pages.reshape(n, -1, shape.kv_heads, shape.head_dim)[:, :s]

    q = inp["q"].reshape(n, s, shape.heads, shape.head_dim)
    return q, dense(inp["k_cache"]), dense(inp["v_cache"])


def _dense_attention(implementation: str):
    return jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                     implementation=implementation))


def bench_shape(shape: Shape, names, args, interpret) -> dict:
    dtype = jnp.dtype(args.dtype)
    inp = make_inputs(shape, dtype)
    attn_args = _attention_args(inp)
    scale = shape.head_dim ** -0.5
    iters = args.iters
    result = {"kind": shape.kind, "heads": shape.heads, "kv_heads": shape.kv_heads,
              "head_dim": shape.head_dim, "tokens": shape.tokens,
              "requests": len(shape.requests), "kv_bytes": shape.kv_bytes(dtype.itemsize),
              "flops": shape.flops(), "results": {}, "errors": {}}
    expected = None
    if _reference_bytes(shape) <= REFERENCE_MAX_BYTES:
        ref = jax.jit(functools.partial(variants()["reference"].fn, scale=scale))
        expected = np.asarray(ref(*attn_args), np.float32)
    else:
        result["errors"]["reference"] = (f"skipped: its gather would need "
                                         f"{_reference_bytes(shape) / 2**30:.0f} GiB")
    dense = _dense_inputs(shape, inp) if shape.kind == "prefill" else None
    if expected is None and dense is not None:  # check against XLA's dense attention instead
        expected = np.asarray(_dense_attention("xla")(*dense), np.float32).reshape(
            shape.tokens, shape.heads, shape.head_dim)

    def run(label, fn):
        try:
            out = fn(*attn_args)
            if expected is not None:
                err = float(np.max(np.abs(np.asarray(out, np.float32) - expected)))
                if not err <= 0.05:
                    raise AssertionError(f"max abs error {err:.3g} vs the reference")
            ms = time_ms(fn, *attn_args, iters=iters)
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            first_line = (str(e).splitlines() or [""])[0]
            result["errors"][label] = f"{type(e).__name__}: {first_line[:300]}"
            print(f"  {label}: {result['errors'][label]}")
            return None
        result["results"][label] = _metric(shape, ms, dtype.itemsize)
        return ms

    for name in names:
        variant = variants()[name]
        case = Case(dtype.name, shape.head_dim, shape.heads, shape.kv_heads, shape.block_size)
        reason = variant.unsupported_reason(case)
        if reason is not None:
            result["errors"][name] = f"unsupported: {reason}"
            continue
        if name == "reference" and expected is None:
            continue
        kw = {"interpret": interpret} if variant.is_pallas else {}
        run(name, jax.jit(functools.partial(variant.fn, scale=scale, **kw)))

    if args.sweep and "triton" in names:
        triton = variants()["triton"].fn
        for knobs in SWEEP[shape.kind]:
            label = "triton[" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]"
            run(label, jax.jit(functools.partial(triton, scale=scale, **knobs)))

    if shape.kind == "decode" and not args.no_baselines:
        try:
            found = _jax_paged_attention(shape, inp, iters, interpret)
        except Exception as e:  # noqa: BLE001
            found = None
            result["errors"]["jax_paged_attention"] = f"{type(e).__name__}: {e}"
        if found is not None:
            ms, config, out = found
            result["results"]["jax_paged_attention"] = {**_metric(shape, ms, dtype.itemsize),
                                                        "config": config}
            if expected is not None:
                result["jax_paged_attention_max_err"] = float(
                    np.max(np.abs(np.asarray(out, np.float32) - expected)))
    if shape.kind == "prefill" and not args.no_baselines:
        for impl in ("cudnn", "xla"):
            if impl == "cudnn" and jax.default_backend() != "gpu":
                result["errors"]["cudnn"] = "skipped: needs a GPU"
                continue
            try:
                ms = time_ms(_dense_attention(impl), *dense, iters=iters)
                result["results"][f"dense_{impl}"] = _metric(shape, ms, dtype.itemsize)
            except Exception as e:  # noqa: BLE001
                result["errors"][f"dense_{impl}"] = f"{type(e).__name__}: {str(e)[:300]}"
    if shape.kind == "mixed":
        parts = {}
        for part, keep in (("decode_part", lambda q: q == 1), ("prefill_part", lambda q: q > 1)):
            sub = dataclasses.replace(shape, name=f"{shape.name}:{part}",
                                      requests=tuple(r for r in shape.requests if keep(r[1])))
            sub_inp = make_inputs(sub, dtype)
            for name in names:
                if not variants()[name].is_pallas or name not in result["results"]:
                    continue
                fn = jax.jit(functools.partial(variants()[name].fn, scale=scale,
                                               interpret=interpret))
                parts.setdefault(name, {})[part] = time_ms(fn, *_attention_args(sub_inp),
                                                           iters=iters)
        result["separate_parts_ms"] = {n: {**{k: round(v, 4) for k, v in p.items()},
                                           "sum": round(sum(p.values()), 4)}
                                       for n, p in parts.items()}
    _add_ratios(shape, result)
    return result


def _add_ratios(shape: Shape, result: dict) -> None:
    ours = {n: r["ms"] for n, r in result["results"].items()
            if (n in variants() and variants()[n].is_pallas) or n.startswith("triton[")}
    if not ours:
        return
    best = min(ours, key=ours.get)
    result["best_kernel"] = best
    baselines = [n for n in result["results"] if n not in ours]
    result["speedup_vs"] = {b: round(result["results"][b]["ms"] / ours[best], 3) for b in baselines}
    if shape.kind == "decode":
        result["target_met"] = result["results"][best]["tb_s"] >= TARGET_DECODE_TBS
    elif shape.kind == "prefill" and "dense_cudnn" in result["results"]:
        result["target_met"] = ours[best] <= result["results"]["dense_cudnn"]["ms"]
    elif shape.kind == "mixed":
        parts = result.get("separate_parts_ms", {})
        timed = [n for n in ours if n in parts]  # sweep configs have no separate parts
        if timed:
            name = min(timed, key=ours.get)
            result["target_met"] = ours[name] <= parts[name]["sum"]


def bench_kv_write(args, interpret, smoke) -> dict:
    """Each writer with the caches donated (in place), at a decode and a prefill size."""
    dtype = jnp.dtype(args.dtype)
    out = {}
    sizes = ((16, 2, 16, 64),) if smoke else ((256, 8, 128, 4096), (8192, 8, 128, 4096))
    for tokens, kv_heads, head_dim, num_blocks in sizes:
        shape = (2, num_blocks, 16, kv_heads, head_dim)
        rng = np.random.default_rng(0)
        slots = jnp.asarray(rng.permutation(np.arange(16, num_blocks * 16))[:tokens], jnp.int32)
        k = jax.random.normal(jax.random.key(0), (tokens, kv_heads, head_dim), dtype)
        row = {}
        for name, writer in KV_WRITERS.items():
            kw = {} if name == "scatter" else {"interpret": interpret}
            fn = jax.jit(functools.partial(writer, **kw), donate_argnums=(0, 1))
            kc, vc = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
            kc, vc = fn(kc, vc, jnp.int32(1), k, k, slots)
            jax.block_until_ready(kc)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(args.iters):
                    kc, vc = fn(kc, vc, jnp.int32(1), k, k, slots)
                jax.block_until_ready(kc)
                best = min(best, (time.perf_counter() - start) / args.iters)
            row[name] = {"ms": round(best * 1e3, 4),
                         "gb_s": round(2 * k.size * dtype.itemsize / best / 1e9, 2)}
        out[f"tokens_{tokens}"] = row
    return out


def bench_scan(args, names, interpret, smoke) -> dict:
    """Layers as a lax.scan with the stacked cache in the carry (donated), write + attention
    per layer through jaxvllm's dispatch: per-layer ms against the standalone kernel's."""
    from jaxvllm.models.attention import AttentionMetadata, KVCache, paged_attention, write_kv

    dtype = jnp.dtype(args.dtype)
    shape = SMOKE_SHAPES[0] if smoke else SHAPES[0]
    layers = 2 if smoke else 8
    inp = make_inputs(shape, dtype, layers=layers)
    tokens = shape.tokens
    slots = np.array([int(inp["block_tables"][r, (s - 1) // shape.block_size])
                      * shape.block_size + (s - 1) % shape.block_size
                      for r, (s, _) in enumerate(shape.requests)], np.int32)
    meta = AttentionMetadata(inp["query_start_loc"], inp["seq_lens"], inp["block_tables"],
                             jnp.asarray(slots))
    kv_new = jax.random.normal(jax.random.key(3), (tokens, shape.kv_heads, shape.head_dim), dtype)
    out = {"shape": shape.name, "layers": layers}
    backends = ["reference"] + [f"pallas:{n}" for n in names if variants()[n].is_pallas]
    backends += ["pallas:triton+kv_triton"] if "triton" in names else []
    for backend in backends:
        def step(kv, q, backend=backend):
            def layer(carry, l):
                x, kv = carry
                kv = write_kv(kv, l, kv_new, kv_new, meta, backend)
                o = paged_attention(x, kv, l, meta, scale=shape.head_dim ** -0.5,
                                    sliding_window=None, backend=backend)
                return (o.astype(x.dtype), kv), None
            (x, kv), _ = jax.lax.scan(layer, (q, kv), jnp.arange(layers, dtype=jnp.int32))
            return x, kv

        if backend == "reference" and _reference_bytes(shape) > REFERENCE_MAX_BYTES:
            continue
        fn = jax.jit(step, donate_argnums=(0,))
        try:
            kv = KVCache(inp["k_cache"] + 0, inp["v_cache"] + 0)
            x, kv = fn(kv, inp["q"])
            jax.block_until_ready(x)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(args.iters):
                    x, kv = fn(kv, inp["q"])
                jax.block_until_ready(x)
                best = min(best, (time.perf_counter() - start) / args.iters)
            out[backend] = {"step_ms": round(best * 1e3, 4),
                            "per_layer_ms": round(best * 1e3 / layers, 4)}
        except Exception as e:  # noqa: BLE001
            out[backend] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def _print_table(name: str, r: dict) -> None:
    print(f"\n{name}: {r['kind']}, {r['requests']} requests, {r['tokens']} tokens, "
          f"H={r['heads']} KVH={r['kv_heads']} D={r['head_dim']}")
    for label, m in sorted(r["results"].items(), key=lambda kv: kv[1]["ms"]):
        unit = f"{m['tb_s']:.3f} TB/s" if "tb_s" in m else f"{m['tflop_s']:.1f} TFLOP/s"
        print(f"  {label:<58} {m['ms']:9.4f} ms  {unit}")
    for label, e in r["errors"].items():
        print(f"  {label:<58} {e}")
    if "separate_parts_ms" in r:
        for n, p in r["separate_parts_ms"].items():
            print(f"  {n} run separately: decode {p.get('decode_part')} ms + prefill "
                  f"{p.get('prefill_part')} ms = {p['sum']} ms")
    if "best_kernel" in r:
        print(f"  best kernel {r['best_kernel']}; speedup vs {r['speedup_vs']}; "
              f"target met: {r.get('target_met')}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    ap.add_argument("--variants", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--only", default=None, help="comma-separated shape names")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton knobs")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated sections: kv_write,scan")
    ap.add_argument("--json-out", default=None,
                    help="also write the result here, after every shape (kept if cut short)")
    args = ap.parse_args(argv)

    interpret = jax.default_backend() == "cpu"
    if interpret and not args.smoke:
        ap.error("on CPU only --smoke runs (the kernels are interpreted)")
    args.iters = args.iters or (2 if args.smoke else 20)
    names = list(variants()) if args.variants is None else args.variants.split(",")
    unknown = [n for n in names if n not in variants()]
    if unknown:
        ap.error(f"unknown variants {unknown}; registered: {sorted(variants())}")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.only:
        wanted = set(args.only.split(","))
        shapes = [s for s in shapes if s.name in wanted]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {args.dtype}, variants {names}")

    result = {"benchmark": "kernels", "device": device.device_kind,
              "platform": jax.default_backend(), "jax": jax.__version__, "dtype": args.dtype,
              "smoke": args.smoke, "interpret": interpret, "variants": names, "shapes": {}}
    def save(complete=False):
        result["complete"] = complete
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result))

    for shape in shapes:
        r = bench_shape(shape, names, args, interpret)
        result["shapes"][shape.name] = r
        _print_table(shape.name, r)
        save()
    skip = set(filter(None, args.skip.split(",")))
    if "kv_write" not in skip:
        result["kv_write"] = bench_kv_write(args, interpret, args.smoke)
        print(f"\nKV write (caches donated): {result['kv_write']}")
        save()
    if "scan" not in skip:
        result["scan"] = bench_scan(args, names, interpret, args.smoke)
        print(f"\nlayer scan (stacked cache in the carry): {result['scan']}")
    save(complete=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
