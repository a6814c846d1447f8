"""Whole decoder layers of a decode step, attention included: one kernel a layer against the
engine's other two ways, in one run.

    python benchmarks/decode_layer.py                    # batch 1, context 512, Qwen2.5-0.5B
    python benchmarks/decode_layer.py --rows 1,8 --k-split 64,128 --num-warps 4,8
    python benchmarks/decode_layer.py --smoke            # tiny shapes, interpret mode (CPU)
    jaxvllm bench decode_layer ...                       # the same

Each of `--rows` requests decodes its next token at position `--context` - 1 of its own KV
blocks, through `--layers` layers of their own random weights (bfloat16, Qwen2.5-0.5B's
geometry), as a multi-step decode call runs them: padded to a power of two of at least 16
rows, the padding rows of seq_len 0 (a batch-1 step is 16 rows, one real);

- `xla`: the projections, norms, RoPE and residuals by XLA, the fused decode attention
  kernel (pallas_kernels/decode_attention_triton.py): the engine's way where its start-up
  measurement keeps XLA's projections;
- `kernels`: the four projections as small-batch kernels (pallas_kernels/
  small_batch_matmul.py) beside the attention kernel: five kernels a layer;
- `layer ...`: the whole layer as one kernel (pallas_kernels/decode_layer.py), for each
  combination of `--k-split` (K rows of a program's weight chunk), `--num-warps` and
  `--attention-splits` (auto: the default for the shapes).

Each runs `--iters` times in one jitted loop compiled with jaxvllm's XLA flags (one CUDA
graph, as a decode step), the hidden state, the caches and the counts carried, so the time
includes the gaps between kernels as the engine has them; the ways take turns after a
warm-up (`jaxvllm.engine.autotune.fastest_each`). Reports us per layer, the weights' read
rate and the ratio to `xla`; each way's output of one layer is checked against `xla`'s. The
last line is one JSON object. On the CPU the kernels run interpreted: only `--smoke` is
meant for it.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402

import jaxvllm  # noqa: E402,F401 - its XLA flags (CUDA graphs for loops), before jax starts
from benchmarks import common  # noqa: E402

BLOCK_SIZE = 16


def build_parser():
    p = common.parser_from_doc("decode_layer.py", __doc__)
    p.add_argument("--rows", type=common.int_list, default=[1])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--k-split", type=common.int_list, default=[128])
    p.add_argument("--num-warps", type=common.int_list, default=[4])
    p.add_argument("--attention-splits", default="auto",
                   help="the attention's key splits to try (auto: the default)")
    common.add_sweep_args(p, iters=20)
    return p


def make_layers(args, seed: int = 0) -> list[dict]:
    """Each layer's weights by the unrolled model's names."""
    import jax.numpy as jnp

    h, i = args.hidden, args.intermediate
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = {"attn_norm_scale": (h,), "qkv_proj": (h, q + 2 * kv), "qkv_bias": (q + 2 * kv,),
              "o_proj": (q, h), "mlp_norm_scale": (h,), "gate_up_proj": (h, 2 * i),
              "down_proj": (i, h)}
    return common.random_layers(shapes, args.layers,
                                jnp.float32 if args.smoke else jnp.bfloat16, seed)


def step_inputs(requests: int, args):
    """(x, k_cache, v_cache, positions, seq_lens, block_tables, slots, inv_freq): each
    request's new token at position context - 1 of its own blocks, the rows padded as the
    engine pads them (`padded_rows`; padding rows of seq_len 0 write to slot 0, the null
    block), caches of random keys and values."""
    import jax
    import jax.numpy as jnp

    from benchmarks.decode_kernel import padded_rows

    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    rows, per_row = padded_rows(requests), -(-args.context // BLOCK_SIZE)
    shape = (args.layers, requests * per_row + 1, BLOCK_SIZE, args.kv_heads, args.head_dim)
    k_key, v_key, x_key = jax.random.split(jax.random.key(requests), 3)
    tables = np.zeros((rows, per_row), np.int32)
    tables[:requests] = 1 + np.arange(requests * per_row, dtype=np.int32).reshape(requests,
                                                                                  per_row)
    real = np.arange(rows) < requests
    pos = np.where(real, args.context - 1, 0).astype(np.int32)
    slots = np.where(real, tables[:, -1] * BLOCK_SIZE + pos % BLOCK_SIZE, 0).astype(np.int32)
    inv_freq = 1.0 / 10000 ** (np.arange(0, args.head_dim, 2) / args.head_dim)
    return (jax.random.normal(x_key, (rows, args.hidden), dtype),
            jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype),
            jnp.asarray(pos), jnp.asarray(np.where(real, pos + 1, 0).astype(np.int32)),
            jnp.asarray(tables), jnp.asarray(slots), jnp.asarray(inv_freq, jnp.float32))


def layer_around_attention(project):
    """A layer as the model's `_layer` runs it with `project(x, w, counters, **epilogue)`
    for each projection (and the step's request count, as the model passes it to the
    small-batch kernels) and the fused decode attention kernel between."""
    import jax

    from pallas_kernels.decode_attention_triton import decode_attention_triton

    def layer(x, p, kv, step, counters, *, args):
        import jax.numpy as jnp

        k_cache, v_cache, layer_index = kv
        positions, seq_lens, tables, slots, inv_freq = step
        q, kvs = args.heads * args.head_dim, args.kv_heads * args.head_dim
        if project is xla_project:
            proj = project
        else:
            proj = functools.partial(project, row_count=jnp.sum(seq_lens > 0, dtype=jnp.int32))
        qkv, counters = proj(x, p["qkv_proj"], counters, bias=p["qkv_bias"],
                                norm_scale=p["attn_norm_scale"], rope_positions=positions,
                                rope_inv_freq=inv_freq, rope_columns=q + kvs)
        qkv = qkv.reshape(x.shape[0], args.heads + 2 * args.kv_heads, args.head_dim)
        o, k_cache, v_cache, counters = decode_attention_triton(
            qkv, k_cache, v_cache, layer_index, seq_lens, tables, slots,
            scale=args.head_dim ** -0.5, num_kv_heads=args.kv_heads, counters=counters,
            interpret=args.smoke or None)
        x, counters = proj(o.reshape(x.shape[0], q), p["o_proj"], counters, residual=x)
        up, counters = proj(x, p["gate_up_proj"], counters, norm_scale=p["mlp_norm_scale"],
                            gated_act=jax.nn.silu)
        x, counters = proj(up, p["down_proj"], counters, residual=x)
        return x, (k_cache, v_cache), counters

    return layer


def xla_project(x, w, counters, **kw):
    from pallas_kernels.small_batch_matmul import reference

    return reference(x, w, **kw), counters


def kernel_project(x, w, counters, *, smoke: bool, row_count=None, **kw):
    from pallas_kernels.small_batch_matmul import fused_matmul

    return fused_matmul(x, w, counters=counters, interpret=smoke or None,
                        row_count=row_count, **kw)


def one_kernel_layer(x, p, kv, step, counters, *, args, **tiling):
    import jax

    from pallas_kernels.decode_layer import decode_layer

    k_cache, v_cache, layer_index = kv
    positions, seq_lens, tables, slots, inv_freq = step
    x, k_cache, v_cache, counters = decode_layer(
        x, p, k_cache, v_cache, layer_index, positions, seq_lens, tables, slots,
        inv_freq=inv_freq, num_heads=args.heads, num_kv_heads=args.kv_heads, norm_eps=1e-6,
        gated_act=jax.nn.silu, scale=args.head_dim ** -0.5, counters=counters,
        interpret=args.smoke or None, **tiling)
    return x, (k_cache, v_cache), counters


def candidates(args) -> list[tuple[str, object]]:
    ways = [("xla", layer_around_attention(xla_project)),
            ("kernels", layer_around_attention(
                functools.partial(kernel_project, smoke=args.smoke)))]
    splits = [None if s == "auto" else int(s) for s in args.attention_splits.split(",")]
    for k_split, warps, att in itertools.product(args.k_split, args.num_warps, splits):
        label = f"layer k{k_split} w{warps} att{att or 'auto'}"
        ways.append((label, functools.partial(one_kernel_layer, k_split=k_split,
                                              num_warps=warps, attention_splits=att)))
    return [(label, functools.partial(fn, args=args)) for label, fn in ways]


def counters_for(args):
    import jax.numpy as jnp

    from pallas_kernels.decode_layer import counters_size
    from pallas_kernels.small_batch_matmul import split_counters

    size = counters_size(args.hidden, args.intermediate, args.heads, args.kv_heads,
                         args.head_dim)
    return jnp.zeros((max(size, split_counters(2 * args.intermediate).shape[0]),), jnp.int32)


def looped(layer, num_layers: int, iters: int):
    """`layer` over every layer's weights, `iters` times in one jitted loop."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def run(x, weights, k_cache, v_cache, step, counters):
        def body(_, carry):
            x, k_cache, v_cache, counters = carry
            for i, p in enumerate(weights):
                x, (k_cache, v_cache), counters = layer(
                    x, p, (k_cache, v_cache, jnp.int32(i)), step, counters)
            return x, k_cache, v_cache, counters

        return lax.fori_loop(0, iters, body, (x, k_cache, v_cache, counters))[0]

    return jax.jit(run)


def bench_rows(rows: int, weights, args) -> dict:
    import jax

    from jaxvllm import xla_flags

    x, k_cache, v_cache, *step = step_inputs(rows, args)
    step = tuple(step)
    counters = counters_for(args)
    operands = (x, weights, k_cache, v_cache, step, counters)

    def one_layer(layer):
        """One layer's output for the check: the requests' rows (the padding rows' differ
        by way). Counts left nonzero (a wait that gave up, a count not reset) fail the way."""
        out, _, counts = jax.jit(layer)(x, weights[0], (k_cache, v_cache, 0), step, counters)
        left = int(np.count_nonzero(np.asarray(counts)))
        if left:
            raise RuntimeError(f"{left} counts not back at zero: a wait gave up (the layer "
                               "kernel's TIMED_OUT) or a count was not reset")
        return np.asarray(out, np.float32)[:rows]

    def compile_loop(layer):
        return looped(layer, len(weights), args.iters).lower(*operands).compile(
            compiler_options=xla_flags.step_compiler_options())

    timed = common.time_against_first(
        candidates(args), compile_loop, one_layer, operands, args,
        layers_a_call=args.iters * len(weights),
        weight_bytes=sum(int(w.size) * w.dtype.itemsize for w in weights[0].values()))
    return {"rows": rows, "padded_rows": int(x.shape[0]), "context": args.context, **timed}


def run(args) -> dict:
    if args.smoke:
        args.rows, args.iters, args.reps, args.layers, args.context = [3], 2, 1, 1, 40
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim = (
            64, 128, 4, 2, 32)
        args.k_split, args.num_warps = [32], [4]
    weights = make_layers(args)
    columns = [("us_per_layer", "us/layer", 9, ".2f"), ("weight_tb_per_s", "TB/s", 7, ".3f"),
               ("vs_xla", "vs xla", 7, ""), ("rel_err", "rel err", 9, ".2e")]
    shapes = []
    for rows in args.rows:
        r = bench_rows(rows, weights, args)
        print(f"-- {rows} requests ({r['padded_rows']} rows), context {args.context}, "
              f"{args.layers} layers, "
              f"{r['weight_mb_per_layer']} MB of weights a layer --")
        common.print_sweep(r["results"], columns, width=26)
        print(f"   best: {r.get('best')}", flush=True)
        shapes.append(r)
    return {"benchmark": "decode_layer", "device": common.device_name(),
            "geometry": {"hidden": args.hidden, "intermediate": args.intermediate,
                         "heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim, "layers": args.layers},
            "iters": args.iters, "shapes": shapes}


def main(argv=None) -> dict:
    return common.main_with_json("decode_layer", build_parser(), run, argv)


if __name__ == "__main__":
    main()
