"""How a step's ragged query tokens are cut into fixed-size query tiles for the kernels.

A kernel program works on one *query tile*: up to `block_q` consecutive query tokens of a
single request (never two requests), times the query heads that share one KV head. Each
request with `q_len` tokens gets `cdiv(q_len, block_q)` tiles, in request order; the tile
table below is computed with jnp inside the jitted step, so the grid has a static size (an
upper bound on the tile count) and the programs past the real count do nothing.

    tokens  |r0: 5 tokens  |r1|r2: 1|r3: 9 tokens           |pad..|     block_q = 4
    tiles   [t0 4][t1 1]   [t2 1]   [t3 4][t4 4][t5 1]       (t6.. empty)

Per tile: its request, its first token's index in the flattened `[T]` axis, its length
(0 for an empty tile) and its first token's position in the request's sequence. A decode is
a tile of length 1; a prefill of 2048 tokens is 2048 / block_q full tiles; both kinds mix in
one grid. The upper bound is exact: every non-empty request wastes less than one tile, so

    num_tiles <= floor((T + min(R, T) * (block_q - 1)) / block_q).

The kernel's output is written per tile, `[num_tiles, KVH, rows, D]` with the rows of a tile
ordered (token, head in group); `tiles_to_tokens` gathers it back to `[T, H, D]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import token_positions

# fields of the packed tile table, rows of the [4, num_tiles] int32 array the kernels read
TILE_REQ, TILE_TOKEN, TILE_LEN, TILE_POS = range(4)

# The kernels' softmax: a finite "minus infinity" (masked scores never produce inf - inf =
# NaN), and exponents in base 2, exp(x) = 2^(x log2 e).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def max_query_tiles(num_tokens: int, num_reqs: int, block_q: int) -> int:
    """Static upper bound on the number of query tiles of a step (at least 1)."""
    busy = min(num_reqs, num_tokens)
    return max(1, (num_tokens + busy * (block_q - 1)) // block_q)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["table", "first_tile"], meta_fields=["block_q"])
@dataclasses.dataclass
class QueryTiles:
    table: jax.Array  # [4, num_tiles] int32: request, first token, length, first position
    first_tile: jax.Array  # [R] int32, index of each request's first tile
    block_q: int


def plan_query_tiles(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int,
                     block_q: int) -> QueryTiles:
    """The tile table of one step (see the module docstring); traceable, static size."""
    num_reqs = seq_lens.shape[0]
    num_tiles = max_query_tiles(num_tokens, num_reqs, block_q)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [R]
    per_req = (q_lens + block_q - 1) // block_q  # [R], 0 for a padding request
    end = jnp.cumsum(per_req).astype(jnp.int32)  # [R]
    first = end - per_req

    i = jnp.arange(num_tiles, dtype=jnp.int32)
    # compare_all, not a binary-search while loop per layer (see token_positions)
    req = jnp.searchsorted(end, i, side="right", method="compare_all").astype(jnp.int32)
    req = jnp.minimum(req, num_reqs - 1)
    k = i - first[req]  # tile index within its request
    valid = i < end[num_reqs - 1]
    token = query_start_loc[req] + k * block_q
    length = jnp.where(valid, jnp.clip(q_lens[req] - k * block_q, 0, block_q), 0)
    pos = seq_lens[req] - q_lens[req] + k * block_q
    token = jnp.clip(jnp.where(valid, token, 0), 0, num_tokens - 1)
    table = jnp.stack([req, token, length, jnp.where(valid, pos, 0)]).astype(jnp.int32)
    return QueryTiles(table, first.astype(jnp.int32), block_q)


def tile_key_steps(first_pos, length, sliding_window: int | None, block_k: int):
    """The keys a tile reads, `[kv_lo, kv_hi)`: from the sliding window's first key (or 0) to
    its last token's position. Returns (kv_hi, first step, end step) in steps of `block_k`
    keys; an empty tile has no steps. Traceable inside a kernel (scalars)."""
    kv_hi = first_pos + length
    kv_lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    step_lo = kv_lo // block_k
    step_hi = jnp.where(length > 0, (kv_hi + block_k - 1) // block_k, step_lo)
    return kv_hi, step_lo, step_hi


def base2_scores(s, soft_cap: float | None):
    """Scores (already scaled, by 1 / soft_cap too when capped) -> the soft cap applied, in
    base 2 for the running softmax: exp(x) = 2^(x log2 e)."""
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s)
    return s * LOG2E


def online_softmax_step(carry, s, mask, v, precision):
    """One block of keys into a FlashAttention-style running softmax (Dao 2023,
    FlashAttention-2, section 3.1), inside a kernel: `carry` = (acc [rows, D], m [rows],
    l [rows]) in float32, `s` [rows, block_k] the scores already in base 2, `mask` where
    they count, `v` [block_k, D]. The output is acc / l once every block is in."""
    acc, m_prev, l_prev = carry
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_next, l_next


def online_softmax_start(rows: int, head_dim: int):
    """The running softmax's carry before any key."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def tiles_to_tokens(out: jax.Array, tiles: QueryTiles, query_start_loc: jax.Array,
                    seq_lens: jax.Array, num_tokens: int, group: int) -> jax.Array:
    """[num_tiles, KVH, block_q * group_pad, D] per-tile rows -> [T, KVH * group, D].

    Tokens that belong to no request (padding past `query_start_loc[R]`) come out zero.
    """
    num_tiles, kv_heads, rows, head_dim = out.shape
    block_q = tiles.block_q
    group_pad = rows // block_q
    req, _, valid = token_positions(query_start_loc, seq_lens, num_tokens)
    offset = jnp.arange(num_tokens, dtype=jnp.int32) - query_start_loc[req]
    tile = jnp.clip(tiles.first_tile[req] + offset // block_q, 0, num_tiles - 1)
    row = offset % block_q
    out = out.reshape(num_tiles, kv_heads, block_q, group_pad, head_dim)
    picked = out[tile, :, row, :group]  # [T, KVH, group, D]
    picked = picked.reshape(num_tokens, kv_heads * group, head_dim)
    return jnp.where(valid[:, None, None], picked, jnp.zeros((), picked.dtype))
