"""Ragged paged attention as one Pallas kernel, Triton lowering (Ampere and Hopper).

Same contract and signature as `ragged_paged_attention_reference` (see
ragged_paged_attention.py): decodes, prefill chunks on cached KV and full prefills, mixed
in any order, in one call; causal; GQA and MHA; optional sliding window and soft cap.

Grid `(query tile, KV head, KV split)`. The query tiles come from `ragged_tiles.py`: up to
`block_q` tokens of one request each, planned with jnp inside the jitted step. One program
takes its tile's tokens times the `group` query heads of its KV head as the rows of one
matrix, `rows = block_q * group_pad` ordered (token, head in group), so K and V are read
once per KV head, not once per query head. It then walks the request's keys `block_k` at a
time through the block table, from the sliding window's first key (or 0) to the tile's last
position, and keeps a FlashAttention-style online softmax (Dao 2023, FlashAttention-2,
section 3.1: rescale the running sum and output by `exp(m_old - m_new)`, divide once at the
end). With `kv_splits > 1` the key range of a tile is cut into that many parts run by
separate programs (flash-decoding: more programs for few long requests); each part writes
its normalised output and log-sum-exp, and a jnp epilogue merges them.

Pallas Triton has no scalar prefetch: the tile table, the layer index and the block tables
are ordinary inputs read with scalar and vector loads. The cache is handed over whole
(`[L, N, B, KVH, D]`) and the kernel indexes the layer itself, so no `cache[layer]` copy is
made. Keys are gathered per element, `k[layer, page[key], key % B, head, :]` with `page`
loaded from the block table, so `block_k` and the page size `B` are independent; a key past
the tile's last position reads the null block 0 (never an out-of-range block).

Triton needs power-of-two tensor sizes and dots of at least 16 x 16 x 16: `block_k`,
`head_dim` and `rows` must be powers of two (`group_pad` pads the group and, for small tiles,
rounds rows up to 16; padded rows are masked). Interpret mode (`interpret=True`, the default
on CPU) runs the same kernel on the host and is what the tests check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention_triton import decode_attention_triton
from pallas_kernels.ragged_tiles import (
    MASK_VALUE,
    base2_scores,
    TILE_LEN,
    TILE_POS,
    TILE_REQ,
    TILE_TOKEN,
    next_power_of_2,
    online_softmax_start,
    online_softmax_step,
    plan_query_tiles,
    tile_key_steps,
    tiles_to_tokens,
)
from pallas_kernels.validation import maybe_validate
from pallas_kernels.variants import register_variant

MIN_DOT = 16  # Triton's smallest dot dimension


def _kernel(
    tiles_ref,  # [4, num_tiles] int32: request, first token, length, first position
    layer_ref,  # [1] int32
    block_tables_ref,  # [R, MB] int32
    q_ref,  # [T, H, D]
    k_ref,  # [L, N, B, KVH, D]
    v_ref,  # [L, N, B, KVH, D]
    o_ref,  # [rows, D] this tile's rows for this KV head (and split)
    *lse_refs,  # ([rows] float32) when kv_splits > 1
    scale: float,
    group: int,
    group_pad: int,
    block_k: int,
    kv_splits: int,
    sliding_window: int | None,
    soft_cap: float | None,
):
    tile, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = o_ref.shape
    block_size = k_ref.shape[2]
    max_blocks = block_tables_ref.shape[1]
    num_tokens = q_ref.shape[0]

    req = tiles_ref[TILE_REQ, tile]
    first_token = tiles_ref[TILE_TOKEN, tile]
    length = tiles_ref[TILE_LEN, tile]
    first_pos = tiles_ref[TILE_POS, tile]
    layer = layer_ref[0]

    r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
    tok = r // group_pad  # token of the row within the tile
    g = r % group_pad  # query head within the group
    row_ok = (tok < length) & (g < group)
    q_pos = first_pos + tok  # [rows] position of each row's token in its sequence

    # gather this tile's queries: padded rows re-read a valid row (masked later)
    q_tok = jnp.clip(first_token + jnp.minimum(tok, jnp.maximum(length - 1, 0)), 0, num_tokens - 1)
    q_head = head * group + jnp.minimum(g, group - 1)
    q = q_ref[q_tok, q_head, :]  # [rows, D]

    # the tile's keys in steps of block_k; this split takes one contiguous part of them
    kv_hi, step_lo, step_hi = tile_key_steps(first_pos, length, sliding_window, block_k)
    per_split = (step_hi - step_lo + kv_splits - 1) // kv_splits
    start = step_lo + split * per_split
    stop = jnp.minimum(start + per_split, step_hi)

    qk_scale = scale if soft_cap is None else scale / soft_cap
    dot_precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(step, carry):
        k_pos = step * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        page_idx = jnp.minimum(k_pos // block_size, max_blocks - 1)
        page = block_tables_ref[req, page_idx]  # [block_k]
        page = jnp.where(k_pos < kv_hi, page, 0)  # beyond the tile: the null block
        slot = k_pos % block_size
        k = k_ref[layer, page, slot, head, :]  # [block_k, D]
        v = v_ref[layer, page, slot, head, :]

        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=dot_precision,
                            preferred_element_type=jnp.float32) * qk_scale  # [rows, block_k]
        s = base2_scores(s, soft_cap)  # m and the masked scores stay in base 2
        mask = row_ok[:, None] & (k_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        return online_softmax_step(carry, s, mask, v, dot_precision)

    acc, m, l = lax.fori_loop(start, stop, body, online_softmax_start(rows, head_dim))

    # rows that saw no key (padding, or an empty split) have l == 0: output 0, no NaN
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    if lse_refs:
        (lse_ref,) = lse_refs
        lse_ref[...] = jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), MASK_VALUE)


def _merge_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """[S, ...rows, D] normalised partial outputs with base-2 log-sum-exps [S, ...rows] ->
    the softmax over all keys (each part weighted by its share of the total sum)."""
    m = jnp.max(lse, axis=0)
    w = jnp.exp2(lse - m[None])  # an empty part has lse = MASK_VALUE: weight 0
    w = w / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[None]
    return jnp.sum(o * w[..., None], axis=0)


def default_block_q(num_tokens: int, num_reqs: int, group_pad: int) -> int:
    """Tokens per query tile from the step's static shapes: 1 when the step is mostly
    decodes (one tile per request, no wasted rows), else enough for ~64 rows."""
    if num_tokens <= num_reqs:
        return 1
    per_req = next_power_of_2(-(-num_tokens // max(num_reqs, 1)))
    return max(1, min(per_req, 64 // group_pad))


def ragged_paged_attention_triton(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    block_k: int = 64,
    kv_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
    debug: bool = False,
) -> jax.Array:
    """Pallas Triton ragged paged attention; returns [T, H, D] in q's dtype.

    Arguments as `ragged_paged_attention_reference`. Static tuning knobs: `block_q` query
    tokens per tile (None: `default_block_q`), `block_k` keys per inner step (a power of
    two), `kv_splits` programs per tile along the keys, Triton's `num_warps` and
    `num_stages`. `interpret=None` interprets on CPU and compiles on GPU.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_blocks, block_size, num_kv_heads, kv_dim = k_cache.shape
    num_reqs = seq_lens.shape[0]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape} does not fit the cache {k_cache.shape}: head_dim must "
                         f"match and heads must be a multiple of KV heads")
    if num_reqs < 1 or query_start_loc.shape != (num_reqs + 1,) \
            or block_tables.shape[0] != num_reqs:
        raise ValueError(f"query_start_loc {query_start_loc.shape}, seq_lens {seq_lens.shape} "
                         f"and block_tables {block_tables.shape} disagree on the request count")
    if block_k & (block_k - 1) or kv_splits < 1:
        raise ValueError(f"block_k={block_k} must be a power of two and kv_splits={kv_splits} >= 1")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    maybe_validate(q, k_cache, query_start_loc, seq_lens, block_tables)

    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    if block_q is None:
        block_q = default_block_q(num_tokens, num_reqs, group_pad)
    if block_q & (block_q - 1):
        raise ValueError(f"block_q={block_q} must be a power of two")
    group_pad = max(group_pad, MIN_DOT // block_q)  # rows >= 16 for Triton's dot
    rows = block_q * group_pad

    tiles = plan_query_tiles(query_start_loc, seq_lens, num_tokens, block_q)
    num_tiles = tiles.table.shape[1]
    layer_arr = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))

    kernel = functools.partial(
        _kernel, scale=scale, group=group, group_pad=group_pad, block_k=block_k,
        kv_splits=kv_splits, sliding_window=sliding_window, soft_cap=soft_cap)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    in_specs = [
        whole(tiles.table.shape),  # tile table
        whole((1,)),  # layer
        whole(block_tables.shape),  # block tables
        whole(q.shape),  # q, gathered per row inside the kernel
        whole(k_cache.shape),  # k cache, all layers
        whole(v_cache.shape),  # v cache, all layers
    ]
    out_shape = [jax.ShapeDtypeStruct((kv_splits, num_tiles, num_kv_heads, rows, head_dim),
                                      q.dtype if kv_splits == 1 else jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, rows, head_dim),
                              lambda t, h, s: (s, t, h, 0, 0))]  # o
    if kv_splits > 1:
        out_shape.append(jax.ShapeDtypeStruct((kv_splits, num_tiles, num_kv_heads, rows),
                                              jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, rows), lambda t, h, s: (s, t, h, 0)))

    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, kv_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=interpret,
        debug=debug,
        name=f"ragged_paged_attention_bq{block_q}_bk{block_k}_s{kv_splits}",
    )(tiles.table, layer_arr, block_tables.astype(jnp.int32), q, k_cache, v_cache)

    if kv_splits == 1:
        out = outs[0][0]
    else:
        out = _merge_splits(*outs).astype(q.dtype)
    return tiles_to_tokens(out, tiles, query_start_loc, seq_lens, num_tokens, group)


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _supports(case) -> str | None:
    d = case.head_dim
    if d < MIN_DOT or d & (d - 1):
        return f"head_dim {d} is not a power of two >= {MIN_DOT} (Triton tiles)"
    return None


register_variant(
    "triton", ragged_paged_attention_triton, lowering="triton", supports=_supports,
    decode=decode_attention_triton,
    description="Pallas Triton, grid (query tile, KV head), online softmax over block_k keys")
# no fused decode kernel: this variant is chosen for its own key splits (kv_splits=4), which
# the fused kernel's `default_tiling` does not follow
register_variant(
    "triton_splitk", functools.partial(ragged_paged_attention_triton, kv_splits=4),
    lowering="triton", supports=_supports,
    description="as 'triton' with each tile's keys split over 4 programs (flash-decoding)")
