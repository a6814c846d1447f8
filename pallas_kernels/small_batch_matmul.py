"""A decoder layer's matmuls for small batches (Pallas Triton), each with the elementwise work
around it in the same kernel.

At batch 1 a decode step is a few hundred small kernels, ~11 a layer: the attention's two,
the four matmuls (XLA's Triton GEMMs, split over K, whose partial sums another kernel adds),
and beside them the RMSNorm before the QKV and gate/up projections, the rotary embeddings,
the SiLU(gate) * up product and the residual adds, each its own kernel. `fused_matmul` does
one projection and what surrounds it:

    y = epilogue(prologue(x) @ w)
    prologue: nothing, or RMSNorm (`norm_scale`, float32 math as `layers.rms_norm`)
    epilogue: + bias; then rotary embeddings on the leading (q and k) heads, or, for a
              fused gate/up matrix, `act(gate) * up`; + residual

so a layer is four such kernels beside its attention: RMSNorm + QKV (+ bias) + RoPE,
O (+ residual), RMSNorm + gate/up + act * up, down (+ residual). With RoPE a program's two
column tiles are a head's rotation partners (columns i and i + head_dim / 2).

One program computes `block_n` output columns for all rows (at most `MAX_ROWS`, padded to a
power of two from 16, Triton's smallest dot) over the whole of K, `block_k` at a time (the
last step masked where K is not a multiple): nothing to add up afterwards, and each
program's RMSNorm is a second read of the rows, which sit in L2. With 16 columns a program,
Qwen2.5-0.5B's projections run 36 (QKV, two tiles each for RoPE), 56 (O, down) and 304
(gate/up, two tiles each) programs. So few programs keep the memory system busy only with
many bytes in flight each: hence wide K steps (512 by default, less where shared memory or
registers would run short) and pipelined loads (`num_stages`). The tiling is not yet tuned
on a GPU: `benchmarks/small_batch_matmul.py` sweeps it. `reference` is the contract in plain
jnp.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_tiles import next_power_of_2

MIN_ROWS = 16  # Triton's smallest dot dimension
MAX_ROWS = 64  # more rows than this: XLA's own GEMMs (one program's rows stay in registers)
BLOCK_N = 16
MAX_BLOCK_K = 512
# Shared memory the pipelined tiles of a default tiling may take (an H100 block can have
# 227 KB; float32 at block_k 512 with two weight tiles would need 228), and the bytes of a
# step's rows (held in registers, normed) for 16-bit and 32-bit types: past these the
# Triton builds for sm_90 spilled registers
SHARED_BUDGET = 160 * 1024
ROWS_TILE_BUDGET = {2: 32 * 1024, 4: 16 * 1024}


def reference(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
              gated_act: Optional[Callable] = None, rope_positions=None, rope_inv_freq=None,
              rope_columns: int = 0):
    """The contract in plain jnp, as the decoder layer computes it unfused."""
    from jaxvllm.models.layers import apply_rope, rms_norm

    if norm_scale is not None:
        x = rms_norm(x, norm_scale, norm_eps)
    y = x @ w
    if bias is not None:
        y = y + bias
    if gated_act is not None:
        gate, up = jnp.split(y, 2, axis=-1)
        y = gated_act(gate) * up
    if rope_columns:
        d = 2 * rope_inv_freq.shape[0]
        heads = apply_rope(y[:, :rope_columns].reshape(y.shape[0], -1, d), rope_positions,
                           rope_inv_freq)
        y = jnp.concatenate([heads.reshape(y.shape[0], rope_columns), y[:, rope_columns:]], -1)
    if residual is not None:
        y = residual + y
    return y


def padded_rows(rows: int) -> int:
    """The rows a kernel runs: a power of two (Triton's shapes), at least MIN_ROWS."""
    return max(MIN_ROWS, next_power_of_2(rows))


def default_block_k(k: int, rows: int, *, itemsize: int = 2, weight_tiles: int = 1,
                    block_n: int = BLOCK_N, num_stages: int = 3) -> int:
    """K a step: all of it up to MAX_BLOCK_K (rounded up to a power of two), less where the
    pipelined tiles of a step (the rows' and each weight tile's, `num_stages` deep) would
    take more than SHARED_BUDGET of shared memory, or the rows' tile more than
    ROWS_TILE_BUDGET."""
    block = min(MAX_BLOCK_K, max(16, next_power_of_2(k)))
    padded = padded_rows(rows)
    per_k = num_stages * (padded + weight_tiles * block_n) * itemsize
    while block > 16 and (block * per_k > SHARED_BUDGET
                          or padded * block * itemsize > ROWS_TILE_BUDGET.get(itemsize, 16384)):
        block //= 2
    return block


def default_num_warps(rows: int, itemsize: int) -> int:
    """4, or 8 for float32 rows past 16 (4 warps spilled registers there)."""
    return 8 if itemsize > 2 and padded_rows(rows) > MIN_ROWS else 4


def supports(rows: int, k: int, n_out: int, *, block_n: int = BLOCK_N,
             rope_head_dim: int = 0) -> bool:
    """Whether `fused_matmul` takes these shapes: few rows, K in 16s, whole output tiles
    (with RoPE, whole tiles in each half of a head)."""
    if rope_head_dim and (rope_head_dim % (2 * block_n) or n_out % rope_head_dim):
        return False
    return rows <= MAX_ROWS and k % 16 == 0 and n_out % block_n == 0


def _kernel(*refs, has_norm: bool, has_bias: bool, has_residual: bool,
            gated_act: Optional[Callable], norm_eps: float, block_n: int, block_k: int,
            n_out: int, rope_columns: int, dot_precision):
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if has_norm else None
    bias_ref = refs.pop(0) if has_bias else None
    residual_ref = refs.pop(0) if has_residual else None
    positions_ref, inv_freq_ref = (refs.pop(0), refs.pop(0)) if rope_columns else (None, None)
    (o_ref,) = refs
    rows, k = x_ref.shape
    if rope_columns:  # this program's tiles: one in each half of a head, i and i + half
        half = inv_freq_ref.shape[0]
        per_half = half // block_n
        freq_at = (pl.program_id(0) % per_half) * block_n
        col = (pl.program_id(0) // per_half) * 2 * half + freq_at
        cols = (col, col + half)
    else:
        col = pl.program_id(0) * block_n
        cols = (col,) if gated_act is None else (col, n_out + col)
    steps = -(-k // block_k)
    ragged = k % block_k != 0

    def load(ref, step, first_col=None):
        """Rows step*block_k.. of a [K] ref, or of the [K, N] weights' tile from column
        `first_col`, or those columns of an [M, K] one, with zeros past K when K is not a
        multiple of block_k."""
        at = pl.ds(step * block_k, block_k)
        if first_col is not None:  # a weight tile [block_k, block_n]
            idx, shape, axis = (at, pl.ds(first_col, block_n)), (block_k, block_n), 0
        elif len(ref.shape) == 1:
            idx, shape, axis = (at,), (block_k,), 0
        else:
            idx, shape, axis = (slice(None), at), (ref.shape[0], block_k), 1
        if not ragged:
            return ref[idx]
        from jax.experimental.pallas import triton as plgpu

        inside = step * block_k + lax.broadcasted_iota(jnp.int32, shape, axis) < k
        return plgpu.load(ref.at[idx], mask=inside, other=0)

    if has_norm:
        def squares(step, total):
            chunk = load(x_ref, step).astype(jnp.float32)
            return total + jnp.sum(chunk * chunk, axis=1)

        total = lax.fori_loop(0, steps, squares, jnp.zeros((rows,), jnp.float32))
        inv_rms = lax.rsqrt(total / k + norm_eps)

    def body(step, accs):
        xs = load(x_ref, step)
        if has_norm:
            xs = (xs.astype(jnp.float32) * inv_rms[:, None]
                  * load(scale_ref, step).astype(jnp.float32)[None, :]).astype(x_ref.dtype)
        return tuple(acc + accs_dot(xs, load(w_ref, step, c)) for acc, c in zip(accs, cols))

    def accs_dot(a, b):
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=dot_precision,
                               preferred_element_type=jnp.float32)

    accs = lax.fori_loop(0, steps, body,
                         tuple(jnp.zeros((rows, block_n), jnp.float32) for _ in cols))

    def biased(acc, c):
        # the projection's result in the model's dtype, as XLA's dot + bias gives it
        y = acc.astype(o_ref.dtype)
        if has_bias:
            y = (y + bias_ref[pl.ds(c, block_n)][None, :]).astype(o_ref.dtype)
        return y

    y = biased(accs[0], col)
    if rope_columns:
        # rotate-half (layers.apply_rope) on the q and k heads; the v heads pass through
        a, b = y.astype(jnp.float32), biased(accs[1], cols[1]).astype(jnp.float32)
        angle = (positions_ref[...].astype(jnp.float32)[:, None]
                 * inv_freq_ref[pl.ds(freq_at, block_n)][None, :])
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        rotate = col < rope_columns
        o_ref[:, pl.ds(col, block_n)] = jnp.where(rotate, a * cos - b * sin, a).astype(
            o_ref.dtype)
        o_ref[:, pl.ds(cols[1], block_n)] = jnp.where(rotate, b * cos + a * sin, b).astype(
            o_ref.dtype)
        return
    if gated_act is not None:
        y = (gated_act(y.astype(jnp.float32)).astype(o_ref.dtype).astype(jnp.float32)
             * biased(accs[1], cols[1]).astype(jnp.float32)).astype(o_ref.dtype)
    if has_residual:
        y = (residual_ref[:, pl.ds(col, block_n)].astype(jnp.float32)
             + y.astype(jnp.float32)).astype(o_ref.dtype)
    o_ref[:, pl.ds(col, block_n)] = y


def fused_matmul(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
                 gated_act: Optional[Callable] = None, rope_positions=None,
                 rope_inv_freq=None, rope_columns: int = 0, block_n: int = BLOCK_N,
                 block_k: Optional[int] = None, num_warps: Optional[int] = None,
                 num_stages: int = 3, interpret: Optional[bool] = None):
    """`reference`'s result from one Pallas Triton kernel. x [M, K] (M <= MAX_ROWS; padded
    inside to `padded_rows(M)`), w [K, N] (gate/up concatenated, [K, 2 I], when `gated_act`),
    bias [N], norm_scale [K], residual [M, N_out]. RoPE: the first `rope_columns` output
    columns are heads of 2 * len(rope_inv_freq) that rotate by `rope_positions` [M]; the
    rest are heads of that size too, left as they are (v)."""
    rows, k = x.shape
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"x {x.shape} and w {w.shape} do not multiply")
    n = w.shape[1]
    if gated_act is not None and n % 2:
        raise ValueError(f"a gated projection needs gate and up halves: w {w.shape}")
    n_out = n // 2 if gated_act is not None else n
    dtype = jnp.promote_types(x.dtype, w.dtype)
    itemsize = jnp.dtype(dtype).itemsize
    block_k = block_k or default_block_k(
        k, rows, itemsize=itemsize, block_n=block_n, num_stages=num_stages,
        weight_tiles=2 if gated_act is not None or rope_columns else 1)
    num_warps = num_warps or default_num_warps(rows, itemsize)
    if not supports(rows, k, n_out, block_n=block_n) or block_k < 16 \
            or block_k & (block_k - 1):
        raise ValueError(f"fused_matmul takes at most {MAX_ROWS} rows, K a multiple of 16, "
                         f"{block_n}-column output tiles and a power-of-two block_k >= 16: "
                         f"x {x.shape}, w {w.shape}, block_k {block_k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {bias.shape} must be ({n},)")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"norm_scale {norm_scale.shape} must be ({k},)")
    if residual is not None and residual.shape != (rows, n_out):
        raise ValueError(f"residual {residual.shape} must be ({rows}, {n_out})")
    rope_head_dim = 0
    if rope_columns:
        rope_head_dim = 2 * rope_inv_freq.shape[0]
        if gated_act is not None or residual is not None or rope_positions.shape != (rows,) \
                or rope_columns % rope_head_dim or rope_columns > n_out \
                or not supports(rows, k, n_out, block_n=block_n, rope_head_dim=rope_head_dim):
            raise ValueError(f"RoPE takes no gate or residual, a position a row, whole heads "
                             f"and {block_n}-column tiles in each half of a head: rows {rows},"
                             f" {rope_columns} of {n_out} columns rotated, head dim "
                             f"{rope_head_dim}, positions {rope_positions.shape}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    from jax.experimental.pallas import triton as plgpu

    padded = padded_rows(rows)
    pad = lambda a: jnp.pad(a, ((0, padded - rows), (0, 0))) if padded != rows else a
    operands = [pad(x.astype(dtype)), w.astype(dtype)]
    for extra in (norm_scale, bias):
        if extra is not None:
            operands.append(extra)
    if residual is not None:
        operands.append(pad(residual.astype(dtype)))
    if rope_columns:
        operands += [jnp.pad(rope_positions.astype(jnp.int32), (0, padded - rows)),
                     rope_inv_freq.astype(jnp.float32)]
    kernel = functools.partial(
        _kernel, has_norm=norm_scale is not None, has_bias=bias is not None,
        has_residual=residual is not None, gated_act=gated_act, norm_eps=float(norm_eps),
        block_n=block_n, block_k=block_k, n_out=n_out, rope_columns=rope_columns,
        dot_precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    out = pl.pallas_call(
        kernel,
        grid=(n_out // block_n // (2 if rope_columns else 1),),
        in_specs=[whole(a.shape) for a in operands],
        out_specs=whole((padded, n_out)),
        out_shape=jax.ShapeDtypeStruct((padded, n_out), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"small_batch_matmul_n{block_n}_k{block_k}",
    )(*operands)
    return out[:rows] if padded != rows else out
