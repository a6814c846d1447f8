"""A decoder layer's matmuls for small batches (Pallas Triton), each with the elementwise work
around it in the same kernel.

At batch 1 a decode step is a few hundred small kernels, ~10 a layer: the four matmuls (XLA's
Triton GEMMs, split over K, whose partial sums another kernel adds), and beside them the
RMSNorm before the QKV and gate/up projections, the SiLU(gate) * up product and the residual
adds, each its own kernel. `fused_matmul` does one projection and what surrounds it:

    y = epilogue(prologue(x) @ w)
    prologue: nothing, or RMSNorm (`norm_scale`, float32 math as `layers.rms_norm`)
    epilogue: + bias; for a fused gate/up matrix `act(gate) * up`; + residual

so a layer is four such kernels beside its attention: RMSNorm + QKV (+ bias), O (+ residual),
RMSNorm + gate/up + act * up, down (+ residual).

One program computes `block_n` output columns for all rows (at most `MAX_ROWS`; the engine
pads a small decode step to 16, Triton's smallest dot) over the whole of K, `block_k` at a
time (the last step masked where K is not a multiple): nothing to add up afterwards, and
each program's RMSNorm is a second read of the rows, which sit in L2. With 16 columns a
program, Qwen2.5-0.5B's projections run 56 (O, down) to 304 (gate/up, two tiles each)
programs. So few programs keep the memory system busy only with many bytes in flight each:
hence wide K steps (512 by default) and pipelined loads (`num_stages`). The tiling is not yet
tuned on a GPU: `benchmarks/small_batch_matmul.py` sweeps it. `reference` is the contract in
plain jnp.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MIN_ROWS = 16  # Triton's smallest dot dimension
MAX_ROWS = 64  # more rows than this: XLA's own GEMMs (one program's rows stay in registers)
BLOCK_N = 16
MAX_BLOCK_K = 512


def reference(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
              gated_act: Optional[Callable] = None):
    """The contract in plain jnp, as the decoder layer computes it unfused."""
    if norm_scale is not None:
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm_eps)
        x = (x32 * norm_scale.astype(jnp.float32)).astype(x.dtype)
    y = x @ w
    if bias is not None:
        y = y + bias
    if gated_act is not None:
        gate, up = jnp.split(y, 2, axis=-1)
        y = gated_act(gate) * up
    if residual is not None:
        y = residual + y
    return y


def default_block_k(k: int, rows: int) -> int:
    """K a step: all of it up to MAX_BLOCK_K (rounded up to a power of two), less for more
    than 16 rows (the rows' tiles, pipelined like the weights', share the shared memory)."""
    most = MAX_BLOCK_K * MIN_ROWS // max(rows, MIN_ROWS)
    return min(max(most, 16), 1 << max(k - 1, 15).bit_length())


def supports(rows: int, k: int, n_out: int, *, block_n: int = BLOCK_N) -> bool:
    """Whether `fused_matmul` takes these shapes: few rows, K in 16s, whole output tiles."""
    return rows <= MAX_ROWS and k % 16 == 0 and n_out % block_n == 0


def _kernel(*refs, has_norm: bool, has_bias: bool, has_residual: bool,
            gated_act: Optional[Callable], norm_eps: float, block_n: int, block_k: int,
            n_out: int, dot_precision):
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if has_norm else None
    bias_ref = refs.pop(0) if has_bias else None
    residual_ref = refs.pop(0) if has_residual else None
    (o_ref,) = refs
    rows, k = x_ref.shape
    col = pl.program_id(0) * block_n
    steps = -(-k // block_k)
    ragged = k % block_k != 0

    def load(ref, step, cols=None):
        """Rows step*block_k.. of a [K] or [K, N] ref, or columns of an [M, K] one, with
        zeros past K when K is not a multiple of block_k."""
        at = pl.ds(step * block_k, block_k)
        if cols is not None:  # a weight tile [block_k, block_n]
            idx, shape, axis = (at, pl.ds(cols, block_n)), (block_k, block_n), 0
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
        dot = lambda c: accs_dot(xs, load(w_ref, step, c))
        if gated_act is None:
            return (accs[0] + dot(col),)
        return accs[0] + dot(col), accs[1] + dot(n_out + col)

    def accs_dot(a, b):
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=dot_precision,
                               preferred_element_type=jnp.float32)

    zeros = jnp.zeros((rows, block_n), jnp.float32)
    accs = lax.fori_loop(0, steps, body, (zeros,) if gated_act is None else (zeros, zeros))

    def biased(acc, c):
        # the projection's result in the model's dtype, as XLA's dot + bias gives it
        y = acc.astype(o_ref.dtype)
        if has_bias:
            y = (y + bias_ref[pl.ds(c, block_n)][None, :]).astype(o_ref.dtype)
        return y

    y = biased(accs[0], col)
    if gated_act is not None:
        y = (gated_act(y.astype(jnp.float32)).astype(o_ref.dtype).astype(jnp.float32)
             * biased(accs[1], n_out + col).astype(jnp.float32)).astype(o_ref.dtype)
    if has_residual:
        y = (residual_ref[:, pl.ds(col, block_n)].astype(jnp.float32)
             + y.astype(jnp.float32)).astype(o_ref.dtype)
    o_ref[:, pl.ds(col, block_n)] = y


def fused_matmul(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
                 gated_act: Optional[Callable] = None, block_n: int = BLOCK_N,
                 block_k: Optional[int] = None, num_warps: int = 4, num_stages: int = 3,
                 interpret: Optional[bool] = None):
    """`reference`'s result from one Pallas Triton kernel. x [M, K] (M <= MAX_ROWS; padded
    to MIN_ROWS inside), w [K, N] (gate/up concatenated, [K, 2 I], when `gated_act`),
    bias [N], norm_scale [K], residual [M, N_out]."""
    rows, k = x.shape
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"x {x.shape} and w {w.shape} do not multiply")
    n = w.shape[1]
    if gated_act is not None and n % 2:
        raise ValueError(f"a gated projection needs gate and up halves: w {w.shape}")
    n_out = n // 2 if gated_act is not None else n
    block_k = block_k or default_block_k(k, rows)
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
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    from jax.experimental.pallas import triton as plgpu

    padded = max(MIN_ROWS, -(-rows // MIN_ROWS) * MIN_ROWS)
    pad = lambda a: jnp.pad(a, ((0, padded - rows), (0, 0))) if padded != rows else a
    dtype = jnp.promote_types(x.dtype, w.dtype)
    operands = [pad(x.astype(dtype)), w.astype(dtype)]
    for extra in (norm_scale, bias):
        if extra is not None:
            operands.append(extra)
    if residual is not None:
        operands.append(pad(residual.astype(dtype)))
    kernel = functools.partial(
        _kernel, has_norm=norm_scale is not None, has_bias=bias is not None,
        has_residual=residual is not None, gated_act=gated_act, norm_eps=float(norm_eps),
        block_n=block_n, block_k=block_k, n_out=n_out,
        dot_precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    out = pl.pallas_call(
        kernel,
        grid=(n_out // block_n,),
        in_specs=[whole(a.shape) for a in operands],
        out_specs=whole((padded, n_out)),
        out_shape=jax.ShapeDtypeStruct((padded, n_out), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"small_batch_matmul_n{block_n}_k{block_k}",
    )(*operands)
    return out[:rows] if padded != rows else out
