"""A token per row of logits as the engine's sampler draws it (jaxvllm/engine/sampler.py),
in three Pallas Triton kernels: greedy rows take the first largest logit, the others invert
their distribution's cumulative sum over vocabulary blocks at two uniform numbers.

Contract (`reference`): for row r with temperature t (greedy below `greedy_below`),

    x = min(logits / t, float32 max), kept where x >= max(row_max + log(min_p), threshold)
    (row_max = max of x; `threshold`, e.g. a top-k/top-p cutoff, -inf for none); weights
    w = exp(x - row_max) summed per block of `block` tokens; the block is the first whose
    running sum reaches (1 - u0) * total, then the token within it the same way at u1, each
    kept within the nonzero weights.

Why: XLA runs that as ~15 small kernels a decode step (row maxima, block sums, a cumulative
sum over blocks, the picks, the argmax's two levels): at batch 1, where a step is a few
hundred kernels whose launches and latencies make up most of its time, that is ~5% of it.
Here the work is split across `num_splits` programs a row (few rows leave a GPU idle
otherwise):

1. `_maxima_kernel` (row, split): its share's largest logit and where it is;
2. `_block_sums_kernel` (row, split): the row maximum from 1's, its share's block sums;
3. `_pick_kernel` (row): the greedy token from 1's, or the block from 2's sums and the token
   within it (that block's logits read again).

The logits are read twice. Float sums run in another order than XLA's, and a GPU's division,
exp and log are not XLA's to the last bit, so a draw that lands within rounding of a
boundary between two tokens may pick the other one; every row's token depends on its own
row alone. For the same reason a cutoff computed outside (`threshold`: XLA's top-k/top-p
from its own division) is taken `THRESHOLD_SLACK` of its size lower, so that the token at
the boundary is not lost to a last-bit difference (with top-k 1 it is the only one kept),
and a row that still keeps nothing gets its greedy token. The draw takes the first token
whose running sum reaches the target and whose weight is not zero: a GPU's parallel
prefix sum need not grow monotonically to the last bit across zero weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_tiles import next_power_of_2

BLOCK = 256  # tokens a block of the inverse CDF (the sampler's VOCAB_BLOCK)
CHUNK_BLOCKS = 8  # blocks a program reads at a time
TARGET_PROGRAMS = 512  # rows x splits, for the first two kernels
MAX_SPLITS = 64
THRESHOLD_SLACK = 2.0 ** -20  # relative; a few float32 ulps
_FMAX = float(jnp.finfo(jnp.float32).max)


def reference(logits, temperature, min_p, threshold, uniforms, *, greedy_below: float):
    """The contract in plain jnp, on the sampler's own functions (its blocks: BLOCK tokens)."""
    from jaxvllm.engine.sampler import argmax_tokens, inverse_cdf_tokens, scaled_logits

    p = logits.astype(jnp.float32)
    t = jnp.where(temperature < greedy_below, 1.0, temperature)
    row_max = scaled_logits(jnp.max(p, axis=-1, keepdims=True), t)
    keep = jnp.maximum(row_max + jnp.log(min_p)[:, None], threshold[:, None])
    x = scaled_logits(p, t)
    sampled = inverse_cdf_tokens(jnp.where(x >= keep, x, -jnp.inf), uniforms, row_max)
    return jnp.where(temperature < greedy_below, argmax_tokens(p), sampled)


def default_num_splits(rows: int, vocab: int, chunk: int) -> int:
    """Programs a row for the first two kernels: ~TARGET_PROGRAMS in all, each at least a
    chunk."""
    return max(1, min(-(-TARGET_PROGRAMS // rows), MAX_SPLITS, -(-vocab // chunk)))


def _chunk(logits_ref, row, start, size: int, vocab: int):
    """logits[row, start:start + size] as float32, -inf past the vocabulary."""
    from jax.experimental.pallas import triton as plgpu

    index = start + lax.broadcasted_iota(jnp.int32, (size,), 0)
    return plgpu.load(logits_ref.at[row, pl.ds(start, size)], mask=index < vocab,
                      other=-jnp.inf).astype(jnp.float32)


def _maxima_kernel(logits_ref, max_ref, arg_ref, *, vocab: int, split_len: int, chunk: int):
    row, split = pl.program_id(0), pl.program_id(1)
    start = split * split_len

    def body(c, carry):
        best, at = carry
        x = _chunk(logits_ref, row, start + c * chunk, chunk, vocab)
        m = jnp.max(x)
        # strictly larger: the first of equal maxima stays
        return jnp.where(m > best, m, best), jnp.where(m > best, start + c * chunk
                                                       + jnp.argmax(x).astype(jnp.int32), at)

    best, at = lax.fori_loop(0, split_len // chunk, body, (jnp.float32(-jnp.inf), start))
    max_ref[row, split] = best
    arg_ref[row, split] = at


def _split_maxima(max_ref, row, num_splits: int):
    """(split indices, the first kernel's maxima of the row's splits, -inf past them),
    [next_power_of_2(num_splits)] each."""
    from jax.experimental.pallas import triton as plgpu

    at = lax.broadcasted_iota(jnp.int32, (next_power_of_2(num_splits),), 0)
    return at, plgpu.load(max_ref.at[row, pl.ds(0, at.shape[0])], mask=at < num_splits,
                          other=-jnp.inf)


def _row_limits(maxima, params_ref, row, greedy_below: float):
    """(the temperature (1 on greedy rows), the row's largest logit, the smallest scaled
    logit kept, the exponent's offset), from the row's split maxima."""
    top = jnp.max(maxima)
    temperature, min_p, threshold = (params_ref[row, i] for i in range(3))
    t = jnp.where(temperature < greedy_below, 1.0, temperature)
    row_max = jnp.minimum(top / t, _FMAX)
    # the same division as the weights' (see the module docstring), unlike the threshold's
    keep = jnp.maximum(row_max + jnp.log(min_p),
                       threshold - jnp.abs(threshold) * THRESHOLD_SLACK)
    offset = jnp.where(jnp.abs(row_max) <= _FMAX, row_max, 0.0)  # -inf: a row of -inf
    return t, top, keep, offset


def _weights(x, t, keep, offset):
    scaled = jnp.minimum(x / t, _FMAX)
    return jnp.where(scaled >= keep, jnp.exp(scaled - offset), 0.0)


def _block_sums_kernel(logits_ref, max_ref, params_ref, sums_ref, *, vocab: int,
                       split_len: int, chunk: int, block: int, num_splits: int,
                       greedy_below: float):
    row, split = pl.program_id(0), pl.program_id(1)
    t, _, keep, offset = _row_limits(_split_maxima(max_ref, row, num_splits)[1], params_ref,
                                     row, greedy_below)
    start = split * split_len

    @pl.when(params_ref[row, 0] >= greedy_below)  # greedy rows need no sums
    def _():
        def body(c, _):
            w = _weights(_chunk(logits_ref, row, start + c * chunk, chunk, vocab), t, keep,
                         offset)
            first = (start + c * chunk) // block
            sums_ref[row, pl.ds(first, chunk // block)] = jnp.sum(
                w.reshape(chunk // block, block), axis=1)
            return 0

        lax.fori_loop(0, split_len // chunk, body, 0)


def _invert(weights, u, size: int):
    """The sampler's `_invert_cdf` for one row of `size` weights."""
    running = jnp.cumsum(weights)
    target = (1.0 - u) * jnp.max(running)  # the total (the largest running sum)
    index = lax.broadcasted_iota(jnp.int32, (size,), 0)
    last = jnp.max(jnp.where(weights > 0, index, 0))
    return jnp.min(jnp.where((running >= target) & (weights > 0), index, last))


def _pick_kernel(logits_ref, max_ref, arg_ref, params_ref, sums_ref, tokens_ref, *,
                 vocab: int, block: int, num_splits: int, num_blocks: int,
                 greedy_below: float):
    from jax.experimental.pallas import triton as plgpu

    row = pl.program_id(0)
    at, maxima = _split_maxima(max_ref, row, num_splits)
    t, top, keep, offset = _row_limits(maxima, params_ref, row, greedy_below)
    # the first split holding the row's first largest logit (all -inf: split 0's first)
    first = jnp.min(jnp.where(maxima == top, at, at.shape[0] - 1))
    greedy = jnp.sum(jnp.where(at == first, plgpu.load(
        arg_ref.at[row, pl.ds(0, at.shape[0])], mask=at < num_splits, other=0), 0))
    tokens_ref[row] = greedy

    @pl.when(params_ref[row, 0] >= greedy_below)
    def _():
        blocks = next_power_of_2(num_blocks)
        b = lax.broadcasted_iota(jnp.int32, (blocks,), 0)
        sums = plgpu.load(sums_ref.at[row, pl.ds(0, blocks)], mask=b < num_blocks, other=0.0)
        chosen = _invert(sums, params_ref[row, 3], blocks)
        w = _weights(_chunk(logits_ref, row, chosen * block, block, vocab), t, keep, offset)
        token = chosen * block + _invert(w, params_ref[row, 4], block)
        tokens_ref[row] = jnp.where(jnp.max(sums) > 0, token, greedy)  # nothing kept: greedy


def sample_tokens(logits, temperature, min_p, threshold, uniforms, *, greedy_below: float,
                  block: int = BLOCK, num_splits: int | None = None, num_warps: int = 4,
                  interpret: bool | None = None):
    """`reference`'s tokens [R] (int32) from the three kernels. logits [R, V]; temperature,
    min_p, threshold [R]; uniforms [R, 2] in [0, 1)."""
    rows, vocab = logits.shape
    for name, a in (("temperature", temperature), ("min_p", min_p),
                    ("threshold", threshold)):
        if a.shape != (rows,):
            raise ValueError(f"{name} {a.shape} must be ({rows},): a value per row of logits "
                             f"{logits.shape}")
    if uniforms.shape != (rows, 2):
        raise ValueError(f"uniforms {uniforms.shape} must be ({rows}, 2)")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16")
    chunk = block * CHUNK_BLOCKS
    num_splits = num_splits or default_num_splits(rows, vocab, chunk)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be at least 1")
    split_len = -(-vocab // (num_splits * chunk)) * chunk
    num_splits = -(-vocab // split_len)  # none past the vocabulary
    num_blocks = num_splits * split_len // block
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    from jax.experimental.pallas import triton as plgpu

    f32 = jnp.float32
    params = jnp.stack([temperature.astype(f32), min_p.astype(f32), threshold.astype(f32),
                        uniforms[:, 0].astype(f32), uniforms[:, 1].astype(f32)], axis=1)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    splits_shape = (rows, next_power_of_2(num_splits))
    sums_shape = (rows, next_power_of_2(num_blocks))
    call = functools.partial(pl.pallas_call, interpret=interpret,
                             compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=3))
    common = dict(vocab=vocab)
    maxima, args = call(
        functools.partial(_maxima_kernel, split_len=split_len, chunk=chunk, **common),
        grid=(rows, num_splits), in_specs=[whole(logits.shape)],
        out_specs=[whole(splits_shape), whole(splits_shape)],
        out_shape=[jax.ShapeDtypeStruct(splits_shape, f32),
                   jax.ShapeDtypeStruct(splits_shape, jnp.int32)],
        name="sample_maxima")(logits)
    limits = dict(num_splits=num_splits, greedy_below=float(greedy_below), **common)
    sums = call(
        functools.partial(_block_sums_kernel, split_len=split_len, chunk=chunk, block=block,
                          **limits),
        grid=(rows, num_splits),
        in_specs=[whole(logits.shape), whole(splits_shape), whole(params.shape)],
        out_specs=whole(sums_shape), out_shape=jax.ShapeDtypeStruct(sums_shape, f32),
        name="sample_block_sums")(logits, maxima, params)
    return call(
        functools.partial(_pick_kernel, block=block, num_blocks=num_blocks, **limits),
        grid=(rows,),
        in_specs=[whole(logits.shape), whole(splits_shape), whole(splits_shape),
                  whole(params.shape), whole(sums_shape)],
        out_specs=whole((rows,)), out_shape=jax.ShapeDtypeStruct((rows,), jnp.int32),
        name="sample_pick")(logits, maxima, args, params, sums)
