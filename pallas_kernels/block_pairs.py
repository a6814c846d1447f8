"""Ragged paged attention for XLA on CPU, as a list of (query rows, KV block) work items.

The jnp reference gathers every token's whole padded context, `[T, S, KVH, D]`: a decode
batch of 64 requests reads 64 x S slots per layer even when most contexts are short, and a
prefill chunk of 256 tokens reads its context 256 times. Here the step is cut into work
items that each pair a few query rows with ONE block of the cache that they can see, so the
cache is read once per block that is really needed (per tile of prompt tokens):

    class A, "last rows":   the last token of every request (a decode is only that), one row
                            per request; a pair for each of its blocks `0 .. seq_len / B`.
    class B, "tile rows":   the other tokens of prefill chunks, cut into tiles of `tile`
                            consecutive tokens of one request; a pair for each block up to
                            the tile's last position (causal).

Each pair computes its scores `[rows, KVH, G, B]`; softmax across the pairs of one row uses
segment max / sum over the (sorted) pair list, and the weighted values are summed the same
way. Padding pairs point at the null block 0 and at a row past the end, which segment
reductions and scatters drop.

A `BlockPairPlan` holds the work lists. The engine builds it on the host with numpy at tight
bucketed sizes (`plan_sizes` + `build_plan(np, ...)`); without one, the kernel builds it
inside the jitted function with jnp at static upper bounds (correct, but sized for the worst
case), so the variant also serves the shared signature of `pallas_kernels.variants`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import HIGHEST
from pallas_kernels.ragged_tiles import MASK_VALUE, max_query_tiles
from pallas_kernels.variants import StepPlanner, register_variant

TILE = 16  # prompt tokens per class-B tile


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["last_token", "last_pos", "a_row", "a_block", "a_start",
                                "tile_token", "tile_pos", "b_tile", "b_block", "b_start"],
                   meta_fields=[])
@dataclasses.dataclass
class BlockPairPlan:
    """The work lists of one step (int32; rows past the end are padding)."""

    last_token: jax.Array  # [R] the request's last token in [T], or T for an empty request
    last_pos: jax.Array  # [R] its position in the sequence
    a_row: jax.Array  # [NA] the request of each class-A pair, R for padding
    a_block: jax.Array  # [NA] physical block id
    a_start: jax.Array  # [NA] position of the block's first slot
    tile_token: jax.Array  # [NT, TILE] tokens of each class-B tile, T for padding
    tile_pos: jax.Array  # [NT, TILE] their positions
    b_tile: jax.Array  # [NB] the tile of each class-B pair, NT for padding
    b_block: jax.Array  # [NB]
    b_start: jax.Array  # [NB]


def _lengths(xp, query_start_loc, seq_lens, block_size: int, tile: int):
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    busy = q_len > 0
    a_count = xp.where(busy, (seq_lens + block_size - 1) // block_size, 0)
    rest = xp.maximum(q_len - 1, 0)  # tokens before the last one
    tiles = (rest + tile - 1) // tile
    return q_len, busy, a_count, rest, tiles


def _tile_blocks(xp, first_pos, rest, k, block_size: int, tile: int):
    """Blocks seen by tile k of a request (first query position `first_pos`, `rest` tokens
    in tiles): those up to its last token's position."""
    return (first_pos + xp.minimum((k + 1) * tile, rest) - 1) // block_size + 1


def plan_sizes(query_start_loc: np.ndarray, seq_lens: np.ndarray, block_size: int,
               tile: int = TILE) -> tuple[int, int, int]:
    """Exact (class-A pairs, tiles, class-B pairs) of a step, for the host to bucket."""
    q_len, _, a_count, rest, tiles = _lengths(np, query_start_loc, seq_lens, block_size, tile)
    k = np.arange(int(tiles.max(initial=0)))[None, :]
    visible = np.where(k < tiles[:, None], _tile_blocks(
        np, (seq_lens - q_len)[:, None], rest[:, None], k, block_size, tile), 0)
    return int(a_count.sum()), int(tiles.sum()), int(visible.sum())


def _segment_of(xp, counts, size: int):
    """For items 0..size-1 laid out segment after segment (`counts` each): the segment of each
    item (len(counts) past the end), its index within the segment, and whether it is real."""
    end = xp.cumsum(counts)
    i = xp.arange(size)
    seg = xp.searchsorted(end, i, side="right")
    valid = i < (end[-1] if counts.shape[0] else 0)
    seg_c = xp.minimum(seg, counts.shape[0] - 1)
    within = i - (end - counts)[seg_c]
    return xp.where(valid, seg, counts.shape[0]), seg_c, within, valid


def build_plan(xp, query_start_loc, seq_lens, block_tables, *, num_tokens: int,
               block_size: int, sizes: tuple[int, int, int], tile: int = TILE) -> BlockPairPlan:
    """The work lists at `sizes` = (NA, NT, NB), with numpy (`xp=np`, on the host) or jnp
    (`xp=jnp`, traced). Sizes below the exact counts of `plan_sizes` would drop work."""
    na, nt, nb = sizes
    nb = nb if nt else 0  # no tiles, no pairs
    i32 = lambda a: a.astype(xp.int32)
    num_reqs, max_blocks = block_tables.shape
    q_len, busy, a_count, rest, tiles = _lengths(xp, query_start_loc, seq_lens, block_size, tile)
    first_pos = seq_lens - q_len

    last_token = xp.where(busy, query_start_loc[1:] - 1, num_tokens)
    a_row, a_req, j, a_ok = _segment_of(xp, a_count, na)
    a_block = xp.where(a_ok, block_tables[a_req, xp.minimum(j, max_blocks - 1)], 0)

    _, t_req, k, t_ok = _segment_of(xp, tiles, nt)
    offset = k[:, None] * tile + xp.arange(tile)[None, :]  # [NT, TILE] within the request
    t_ok2 = t_ok[:, None] & (offset < rest[t_req][:, None])
    tile_token = xp.where(t_ok2, query_start_loc[t_req][:, None] + offset, num_tokens)
    tile_pos = first_pos[t_req][:, None] + offset
    visible = xp.where(t_ok, _tile_blocks(xp, first_pos[t_req], rest[t_req], k, block_size,
                                          tile), 0)
    b_tile, b_of, jb, b_ok = _segment_of(xp, visible, nb)
    b_block = xp.where(b_ok, block_tables[t_req[b_of], xp.minimum(jb, max_blocks - 1)], 0)
    return BlockPairPlan(
        i32(last_token), i32(seq_lens - 1), i32(a_row), i32(a_block), i32(j * block_size),
        i32(tile_token), i32(tile_pos), i32(b_tile), i32(b_block), i32(jb * block_size))


def _segment(op, x, pair_row, num_rows):
    """Reduce the pairs' `x` into their rows; pairs of row `num_rows` (padding) drop out."""
    return op(x, pair_row, num_segments=num_rows, indices_are_sorted=True)


def _last_row_scores(q, k):
    """One query row per pair, q [P, KVH, G, D] x k [P, B, KVH, D] -> [P, B, KVH, G].

    Broadcast-multiply-reduce instead of einsum: XLA fuses the block gather into it and
    reads each block once, where a dot over [1 x D] rows would pay per tiny matmul."""
    return (q[:, None] * k[:, :, :, None, :]).sum(-1)


def _last_row_values(p, v):
    """p [P, B, KVH, G] x v [P, B, KVH, D] -> [P, KVH, G, D]."""
    return (p[..., None] * v[:, :, :, None, :]).sum(1)


def _tile_scores(q, k):
    """Tiles of rows, q [P, Q, KVH, G, D] x k [P, B, KVH, D] -> [P, Q, KVH, G, B]."""
    return jnp.einsum("pqkgd,pbkd->pqkgb", q, k, precision=HIGHEST)


def _tile_values(p, v):
    return jnp.einsum("pqkgb,pbkd->pqkgd", p, v, precision=HIGHEST)


# (scores, values, key axis of the scores, the mask [P, Q, B] in the scores' layout)
LAST_ROWS = (_last_row_scores, _last_row_values, 1, lambda m: m[:, 0, :, None, None])
TILE_ROWS = (_tile_scores, _tile_values, -1, lambda m: m[:, :, None, None, :])


def _attend(q_rows, row_pos, pair_row, pair_block, pair_start, k_cache, v_cache, layer, *,
            kind, sliding_window, soft_cap):
    """Query rows q_rows [N, (Q,) KVH, G, D] at positions row_pos [N, Q] over the blocks of
    their pairs -> q_rows' shape in float32 (zeros for rows that see nothing). `kind` is
    LAST_ROWS (one row each, no Q axis) or TILE_ROWS."""
    scores, values, key_axis, mask_layout = kind
    num_rows = q_rows.shape[0]
    block_size = k_cache.shape[2]
    row = jnp.minimum(pair_row, num_rows - 1)
    # one gather over (layer, block): cache[layer][blocks] would first slice out the layer
    k = k_cache[layer, pair_block].astype(jnp.float32)  # [P, B, KVH, D]
    v = v_cache[layer, pair_block].astype(jnp.float32)
    s = scores(q_rows[row], k)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    slot = (pair_start[:, None] + jnp.arange(block_size)[None, :])[:, None, :]  # [P, 1, B]
    pos = row_pos[row][:, :, None]  # [P, Q, 1]
    mask = (slot <= pos) & (pair_row < num_rows)[:, None, None]
    if sliding_window is not None:
        mask &= slot > pos - sliding_window
    mask = mask_layout(mask)

    s = jnp.where(mask, s, MASK_VALUE)
    row_max = _segment(jax.ops.segment_max, s.max(key_axis), pair_row, num_rows)
    row_max = jnp.where(row_max > MASK_VALUE / 2, row_max, 0.0)
    p = jnp.where(mask, jnp.exp(s - jnp.expand_dims(row_max[row], key_axis)), 0.0)
    denom = _segment(jax.ops.segment_sum, p.sum(key_axis), pair_row, num_rows)
    out = _segment(jax.ops.segment_sum, values(p, v), pair_row, num_rows)
    return out / jnp.where(denom > 0, denom, 1.0)[..., None]


def block_pair_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                         *, scale: float, sliding_window: int | None = None,
                         soft_cap: float | None = None,
                         plan: BlockPairPlan | None = None) -> jax.Array:
    """Ragged paged attention (the contract of `ragged_paged_attention_reference`) over the
    work items of `plan`, or of a worst-case plan built here when none is given."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    if plan is None:
        num_reqs, max_blocks = block_tables.shape
        tiles = max_query_tiles(num_tokens, num_reqs, TILE)
        plan = build_plan(jnp, query_start_loc, seq_lens, block_tables, num_tokens=num_tokens,
                          block_size=block_size,
                          sizes=(num_reqs * max_blocks, tiles, tiles * max_blocks))
    kw = dict(k_cache=k_cache, v_cache=v_cache, layer=layer, sliding_window=sliding_window,
              soft_cap=soft_cap)
    qg = q.reshape(num_tokens, kv_heads, group, head_dim).astype(jnp.float32) * scale

    # a row index of T (padding) gathers a clipped row and is dropped by the scatter
    last = _attend(qg[jnp.minimum(plan.last_token, num_tokens - 1)], plan.last_pos[:, None],
                   plan.a_row, plan.a_block, plan.a_start, kind=LAST_ROWS, **kw)
    out = jnp.zeros((num_tokens, kv_heads, group, head_dim), jnp.float32)
    out = out.at[plan.last_token].set(last, mode="drop")
    if plan.tile_token.shape[0] and plan.b_tile.shape[0]:
        rows = _attend(qg[jnp.minimum(plan.tile_token, num_tokens - 1)], plan.tile_pos,
                       plan.b_tile, plan.b_block, plan.b_start, kind=TILE_ROWS, **kw)
        out = out.at[plan.tile_token].set(rows, mode="drop")
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def padded_size(n: int, minimum: int = 16) -> int:
    """Work-list sizes the engine compiles for: 0, or 2^k or 3 * 2^(k-1) (<= 1/3 padding),
    at least `minimum`."""
    if n <= 0:
        return 0
    size = minimum
    while size < n:
        size = max(size + 1, size * 3 // 2) if size & (size - 1) == 0 else size // 3 * 4
    return size


def compile_sizes(sizes: tuple[int, int, int]) -> tuple[int, int, int]:
    """The sizes to compile for a step of `sizes` that no program fits: rounded by
    `padded_size`, with a quarter more room in steps with prompt tiles, whose last-row pairs
    grow step after step while prompts are being admitted."""
    na, nt, nb = sizes
    if nt:
        na, nt, nb = na + na // 4, nt + nt // 4, nb + nb // 4
    return padded_size(na), padded_size(nt, 1), padded_size(nb)


def plan_fits(sizes: tuple[int, int, int], compiled: tuple[int, int, int]) -> bool:
    """Whether to run a step of `sizes` padded to a program compiled for `compiled`.

    A padded pair costs what a real one does (~0.1 ms per step for SmolLM2 on a 2-core CPU)
    and a new program ~1.5 s to compile. Decode steps (no tiles) are mostly attention and
    pad at most 1.5x (or 48 pairs); steps with prompt tiles spend most of their time in the
    matmuls of their many tokens and pad up to 2x (or 64 pairs)."""
    na, nt, nb = sizes
    cna, cnt, cnb = compiled
    if (nt == 0) != (cnt == 0):
        return False
    if nt == 0:
        return na <= cna <= max(na * 3 // 2, na + 48)
    return (na <= cna <= max(2 * na, na + 64) and nt <= cnt <= 2 * nt
            and nb <= cnb <= max(2 * nb, 64))


def host_plan(query_start_loc, seq_lens, block_tables, num_tokens: int, block_size: int,
              sizes: tuple[int, int, int] | None = None) -> BlockPairPlan:
    """The engine's plan of a step (numpy in, numpy out), at `sizes` or the compiled ones."""
    if sizes is None:
        sizes = compile_sizes(plan_sizes(query_start_loc, seq_lens, block_size))
    return build_plan(np, query_start_loc, seq_lens, block_tables, num_tokens=num_tokens,
                      block_size=block_size, sizes=sizes)


register_variant(
    "block_pairs", block_pair_attention, lowering="xla",
    plan=StepPlanner(plan_sizes, plan_fits, compile_sizes, host_plan),
    description="XLA (the CPU default): (query rows, KV block) work items, segment softmax")
