"""The small-batch projection kernels against XLA on a decoder layer's projections, in one run.

    python benchmarks/small_batch_matmul.py                # rows 1 and 64, Qwen2.5-0.5B's shapes
    python benchmarks/small_batch_matmul.py --block-n 16,32 --block-k 256,512 --splits auto,1,4
    python benchmarks/small_batch_matmul.py --smoke        # tiny shapes, interpret mode (CPU)
    jaxvllm bench small_batch_matmul ...                   # the same

Times a decoder layer without its attention, as a decode step of `rows` requests runs it
(padded as the engine pads a multi-step decode: a power of two, at least 16 rows), over
`--layers` layers of their own weights, bfloat16, Qwen2.5-0.5B's geometry by default:

    qkv = rope(norm(x) @ W_qkv + b);  x = x + qkv[:, :hidden] @ W_o    (the attention's stand-in:
    h = act(norm(x) @ W_gate) * (norm(x) @ W_up);  x = x + h @ W_down   the query part of qkv)

- `xla`: as the model runs it without `small_batch_matmuls`: XLA's fusions and GEMMs;
- `default`: the four projections as `fused_matmul` kernels with their default tiling;
- every combination of `--block-n`, `--block-k`, `--num-stages` and `--splits` (one tiling
  for all four; the QKV projection's column tile at most half a head, which RoPE needs;
  `auto` splits: the default for each projection's shape).

With `--per-projection` each projection's tilings are timed on their own instead: the layer
with that projection's tiling changed and the other three at their defaults, against the
layer with that projection computed by XLA; a tiling that comes out the same for the
projection's shape as one already tried (`resolve_tiling`) runs once. Each line names the
tiling as it runs: column tile, K step, K a split, splits, programs (an H100 has 132 SMs).

Each runs `--iters` times in one jitted loop compiled with jaxvllm's XLA flags (the loop one
CUDA graph, as a decode step's), so the time includes the gaps between kernels as the
engine has them. The configurations take turns after a warm-up, each call's time its own
(`jaxvllm.engine.autotune.fastest_each`, as the engine's start-up measurement times them):
timed first and alone, a configuration meets the GPU's clocks still rising. Reports us per
layer, the weights' read rate (their bytes / time), and the ratio to `xla`; every output is
checked against `xla`'s first. The last line is one JSON object. On the CPU the kernels run
interpreted: only `--smoke` is meant for it.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402

import jaxvllm  # noqa: E402,F401 - its XLA flags (CUDA graphs for loops), before jax starts
from benchmarks import common  # noqa: E402
from benchmarks.decode_kernel import padded_rows  # noqa: E402
from pallas_kernels.small_batch_matmul import split_counters  # noqa: E402


def build_parser():
    p = common.parser_from_doc("small_batch_matmul.py", __doc__)
    p.add_argument("--rows", type=common.int_list, default=[1, 64])
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--kv-size", type=int, default=128, help="K (and V) columns of W_qkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--block-n", type=common.int_list, default=[32, 64])
    p.add_argument("--block-k", type=common.int_list, default=[128, 256])
    p.add_argument("--num-stages", type=common.int_list, default=[3])
    p.add_argument("--splits", default="auto,1",
                   help="splits of K to try (auto: each projection's default)")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--per-projection", action="store_true",
                   help="sweep each projection's tiling on its own (the others at defaults)")
    p.add_argument("--projections", default=",".join(PROJECTION_SHAPES),
                   help="the projections --per-projection sweeps")
    common.add_sweep_args(p, iters=50)
    return p


def make_weights(args, seed: int = 0) -> list[dict]:
    """One dict of projection weights (and norm scales, the QKV bias) per layer."""
    import jax.numpy as jnp

    h, i = args.hidden, args.intermediate
    shapes = {"w_qkv": (h, h + 2 * args.kv_size), "b_qkv": (h + 2 * args.kv_size,),
              "attn_norm": (h,), "w_o": (h, h), "mlp_norm": (h,), "w_gate_up": (h, 2 * i),
              "w_down": (i, h)}
    return common.random_layers(shapes, args.layers,
                                jnp.float32 if args.smoke else jnp.bfloat16, seed)


def rope_arguments(rows: int, args) -> dict:
    """The QKV projection's rotary embeddings: `rows` rows at positions 500.., the q and k
    columns rotated."""
    import jax.numpy as jnp

    inv_freq = 1.0 / 10000 ** (np.arange(0, args.head_dim, 2) / args.head_dim)
    return {"rope_positions": 500 + jnp.arange(rows, dtype=jnp.int32),
            "rope_inv_freq": jnp.asarray(inv_freq, jnp.float32),
            "rope_columns": args.hidden + args.kv_size}


def layer_xla(x, p, counters, rope: dict):
    """The layer's projections as the unfused model computes them (the counters pass
    through)."""
    import jax

    from pallas_kernels.small_batch_matmul import reference

    qkv = reference(x, p["w_qkv"], bias=p["b_qkv"], norm_scale=p["attn_norm"], **rope)
    x = reference(qkv[:, :x.shape[1]], p["w_o"], residual=x)
    h = reference(x, p["w_gate_up"], norm_scale=p["mlp_norm"], gated_act=jax.nn.silu)
    return reference(h, p["w_down"], residual=x), counters


def layer_fused(x, p, counters, rope: dict, *, own: Optional[dict] = None, xla=(),
                **tiling):
    """The same as four `fused_matmul` kernels, the split ones' counts passed along as the
    model passes them. `tiling` for all four, or `own[name]` for projection `name` (qkv, o,
    gate_up, down); those named in `xla` computed by XLA instead."""
    import jax

    from pallas_kernels.small_batch_matmul import fused_matmul, reference

    def project(name, x, w, counters, **kw):
        if name in xla:
            return reference(x, w, **kw), counters
        chosen = dict((own or {}).get(name, tiling))
        if name == "qkv" and chosen.get("block_n"):  # RoPE: whole tiles in half a head
            chosen["block_n"] = min(chosen["block_n"], rope["rope_inv_freq"].shape[0])
        return fused_matmul(x, w, counters=counters, **chosen, **kw)

    qkv, counters = project("qkv", x, p["w_qkv"], counters, bias=p["b_qkv"],
                            norm_scale=p["attn_norm"], **rope)
    x, counters = project("o", qkv[:, :x.shape[1]], p["w_o"], counters, residual=x)
    h, counters = project("gate_up", x, p["w_gate_up"], counters, norm_scale=p["mlp_norm"],
                          gated_act=jax.nn.silu)
    return project("down", h, p["w_down"], counters, residual=x)


def looped(layer, num_layers: int, iters: int):
    """`layer` over every layer's weights (each its own array, as the unrolled model holds
    them), `iters` times in one jitted loop, the hidden state and the counts carried."""
    import jax
    from jax import lax

    def run(x, weights):
        def body(_, carry):
            x, counters = carry
            for p in weights:
                x, counters = layer(x, p, counters)
            return x, counters

        return lax.fori_loop(0, iters, body, (x, layer_counters(weights)))[0]

    return jax.jit(run)


def layer_counters(weights):
    """The split kernels' counts for layers of `weights` (`split_counters`, wide enough for
    the widest projection)."""
    return split_counters(max(w.shape[1] for w in weights[0].values() if w.ndim == 2))


def configurations(args):
    """(label, fused_matmul tiling keywords) of every tiling asked for."""
    splits = [None if s == "auto" else int(s) for s in args.splits.split(",") if s]
    for bn, bk, st, sp in itertools.product(args.block_n, args.block_k, args.num_stages,
                                            splits):
        yield f"bn{bn} bk{bk} st{st} s{sp or 'auto'}", dict(
            block_n=bn, block_k=bk, num_stages=st, splits=sp, num_warps=args.num_warps)


def bench_rows(rows: int, weights, args) -> dict:
    """The whole layer's projections, XLA's against the kernels' at each tiling."""
    import jax

    T = padded_rows(rows)
    x = jax.random.normal(jax.random.key(1), (T, args.hidden), weights[0]["w_o"].dtype)
    rope = rope_arguments(T, args)
    interpret = {"interpret": True} if args.smoke else {}
    candidates = [("xla", functools.partial(layer_xla, rope=rope)),
                  ("default", functools.partial(layer_fused, rope=rope, **interpret))]
    candidates += [(label, functools.partial(layer_fused, rope=rope, **kw, **interpret))
                   for label, kw in configurations(args)]
    return {"rows": rows, "padded_rows": T, **time_candidates(candidates, x, weights, args)}


# Each projection's shape (K, output columns, weight tiles a program: gate and up, or a
# head's rotation partners) and whether RoPE tiles its columns, from the layer's geometry
PROJECTION_SHAPES = {
    "qkv": lambda a: (a.hidden, a.hidden + 2 * a.kv_size, 2, a.head_dim),
    "o": lambda a: (a.hidden, a.hidden, 1, 0),
    "gate_up": lambda a: (a.hidden, a.intermediate, 2, 0),
    "down": lambda a: (a.intermediate, a.hidden, 1, 0),
}


def bench_projections(rows: int, weights, args) -> dict:
    """Each projection's tilings on its own: the layer with that projection's tiling
    changed, the other three at their defaults (`xla`: that projection computed by XLA).
    Tilings that come out the same for a projection's shape (`resolve_tiling`) run once."""
    import jax

    from pallas_kernels.small_batch_matmul import resolve_tiling

    T = padded_rows(rows)
    x = jax.random.normal(jax.random.key(1), (T, args.hidden), weights[0]["w_o"].dtype)
    rope = rope_arguments(T, args)
    interpret = {"interpret": True} if args.smoke else {}
    itemsize = weights[0]["w_o"].dtype.itemsize
    out = {"rows": rows, "padded_rows": T, "projections": {}}
    layer = functools.partial(layer_fused, rope=rope, **interpret)
    label = "bn{} bk{} ks{} s{} ({} programs)".format
    for name in args.projections.split(","):
        k, n_out, weight_tiles, rope_head_dim = PROJECTION_SHAPES[name](args)
        default = resolve_tiling(T, k, n_out, itemsize=itemsize, weight_tiles=weight_tiles,
                                 rope_head_dim=rope_head_dim)
        candidates = [("xla", functools.partial(layer, xla=(name,))),
                      (f"default {label(*default)}", layer)]
        tilings = {candidates[1][0]: default}
        seen = {default}
        for _, kw in configurations(args):
            tiling = {key: v for key, v in kw.items() if key != "num_warps"}
            if rope_head_dim and tiling["block_n"]:
                tiling["block_n"] = min(tiling["block_n"], rope_head_dim // 2)
            try:
                resolved = resolve_tiling(T, k, n_out, itemsize=itemsize,
                                          weight_tiles=weight_tiles,
                                          rope_head_dim=rope_head_dim, **tiling)
            except ValueError:
                continue
            if resolved not in seen and n_out % resolved[0] == 0:
                seen.add(resolved)
                tilings[label(*resolved)] = resolved
                candidates.append((label(*resolved), functools.partial(layer, own={name: kw})))
        result = time_candidates(candidates, x, weights, args)
        # as JAXVLLM_SMALL_BATCH_TILINGS takes it: {"KxN": [block_n, splits]}
        result["shape"] = f"{k}x{n_out}"
        for tiled, (block_n, _, _, splits, _) in tilings.items():
            result["results"][tiled]["tiling"] = [block_n, splits]
        out["projections"][name] = result
    return out


def time_candidates(candidates, x, weights, args) -> dict:
    """Each `(label, layer)` looped over the layers' weights and timed against the first
    (XLA's): {"results": {label: us a layer, ...}, "best": the fastest label but the first}."""
    import jax

    from jaxvllm import xla_flags

    def compile_loop(layer):
        return looped(layer, len(weights), args.iters).lower(x, weights).compile(
            compiler_options=xla_flags.step_compiler_options())

    counters = layer_counters(weights)

    def one_output(layer):  # one iteration of one layer, for the check
        return np.asarray(jax.jit(layer)(x, weights[0], counters)[0], np.float32)

    return common.time_against_first(
        candidates, compile_loop, one_output, (x, weights), args,
        layers_a_call=args.iters * len(weights),
        weight_bytes=sum(int(w.size) * w.dtype.itemsize for w in weights[0].values()))


def run(args) -> dict:
    if args.smoke:
        args.rows, args.iters, args.reps, args.layers = [20], 2, 1, 2
        args.hidden, args.intermediate, args.kv_size, args.head_dim = 64, 96, 32, 32
        args.block_n, args.block_k, args.num_stages, args.splits = [16], [32], [2], "2"
    weights = make_weights(args)
    shapes = []
    columns = [("us_per_layer", "us/layer", 9, ".2f"), ("weight_tb_per_s", "TB/s", 7, ".3f"),
               ("vs_xla", "vs xla", 7, "")]
    for rows in dict.fromkeys(padded_rows(r) for r in args.rows):
        if args.per_projection:
            r = bench_projections(rows, weights, args)
            for name, p in r["projections"].items():
                print(f"-- {rows} rows, {args.layers} layers: {name}'s tilings, the other "
                      f"projections at their defaults --")
                common.print_sweep(p["results"], columns, width=44)
                print(f"   best: {p.get('best')}", flush=True)
        else:
            r = bench_rows(rows, weights, args)
            print(f"-- {rows} rows, {args.layers} layers, {r['weight_mb_per_layer']} MB of "
                  f"weights a layer --")
            common.print_sweep(r["results"], columns, width=22)
            print(f"   best: {r.get('best')}", flush=True)
        shapes.append(r)
    return {"benchmark": "small_batch_matmul", "device": common.device_name(),
            "geometry": {"hidden": args.hidden, "intermediate": args.intermediate,
                         "kv_size": args.kv_size, "head_dim": args.head_dim,
                         "layers": args.layers},
            "iters": args.iters, "shapes": shapes}


def main(argv=None) -> dict:
    return common.main_with_json("small_batch_matmul", build_parser(), run, argv)


if __name__ == "__main__":
    main()
