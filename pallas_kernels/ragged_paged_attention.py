"""Ragged paged attention over a block-table-indexed, layer-stacked KV cache.

One call serves a whole step: every request contributes `q_len >= 1` query tokens (a decode
has one, a prefill chunk several), flattened into one `[T]` token axis. A request's keys are
the first `seq_len` slots of its blocks; its query tokens are the last `q_len` of those, so
token `i` of request `r` sits at position `seq_len[r] - q_len[r] + i` and sees keys up to
and including that position (causal), optionally only the last `sliding_window` of them.

Layout (shapes):
    q              [T, H, D]            this step's queries, requests back to back
    k_cache        [L, N, B, KVH, D]    L layers, N blocks of B slots, KV heads, head dim
    v_cache        [L, N, B, KVH, D]
    layer          []                   which layer of the stacked cache to read
    query_start_loc[R + 1]              request r owns tokens [qsl[r], qsl[r+1])
    seq_lens       [R]                  tokens in the cache for r, this step's included
    block_tables   [R, MB]              block ids of r in order; slot s is at
                                        (block_tables[r, s // B], s % B)

Padding: tokens at or past `query_start_loc[R]` and requests with `seq_len == 0` produce
zeros, never NaNs. Block 0 is the engine's null block that padding points at.

The Pallas kernel arrives behind this same signature; this module holds the reference that
the kernel tests compare against and that the engine uses on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 products as float32 on a GPU too (its default would use TF32 for them)
HIGHEST = jax.lax.Precision.HIGHEST


def token_positions(query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int):
    """(request index [T], position in its sequence [T], valid [T]) for every token slot."""
    num_reqs = seq_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # compare_all: one fused comparison; the default binary search is a while loop of a
    # dozen tiny kernels (and host round trips on a GPU) in every layer
    req = jnp.searchsorted(query_start_loc[1:], t, side="right",
                           method="compare_all").astype(jnp.int32)
    req = jnp.minimum(req, num_reqs - 1)
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    pos = seq_lens[req] - q_len[req] + (t - query_start_loc[req])
    valid = t < query_start_loc[num_reqs]
    return req, pos, valid


def ragged_paged_attention_reference(
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
) -> jax.Array:
    """Plain-jnp ragged paged attention; returns [T, H, D] in q's dtype.

    Each token gathers its own request's keys ([T, S, KVH, D] transient), which is simple
    and exact but memory-hungry for long prefills: the Pallas kernel is the fast path.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    span = max_blocks * block_size

    req, pos, valid = token_positions(query_start_loc, seq_lens, num_tokens)
    blocks = block_tables[req]  # [T, MB]
    k = k_cache[layer][blocks].reshape(num_tokens, span, num_kv_heads, head_dim)
    v = v_cache[layer][blocks].reshape(num_tokens, span, num_kv_heads, head_dim)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,tskd->tkgs", qg, k.astype(jnp.float32), precision=HIGHEST) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)

    s = jnp.arange(span, dtype=jnp.int32)[None, :]
    mask = (s <= pos[:, None]) & valid[:, None]
    if sliding_window is not None:
        mask &= s > pos[:, None] - sliding_window
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping):
    """Scatter this step's k, v [T, KVH, D] into slot `slot_mapping[t]` of `layer`.

    Slots are `block * B + offset`; padding tokens point into the null block 0.
    """
    block_size = k_cache.shape[2]
    block = slot_mapping // block_size
    offset = slot_mapping % block_size
    k_cache = k_cache.at[layer, block, offset].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, block, offset].set(v.astype(v_cache.dtype))
    return k_cache, v_cache
