"""The ragged paged attention reference and the KV write against a naive dense attention in
numpy: per request, the keys are its whole sequence and its queries the last q_len tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    token_positions,
    write_kv_reference,
)

LAYERS = 2
LAYER = 1

# jitted as the model runs them (with a traced layer index); one compile per case shape
attention = jax.jit(ragged_paged_attention_reference,
                    static_argnames=("scale", "sliding_window", "soft_cap"))
write_kv = jax.jit(write_kv_reference)


def dense_attention(q, k, v, *, scale, window=None, soft_cap=None):
    """q [n, H, D] for the last n positions of a sequence with k, v [S, KVH, D]."""
    n, heads, _ = q.shape
    seq, kv_heads, _ = k.shape
    group = heads // kv_heads
    out = np.zeros(q.shape, np.float64)
    for i in range(n):
        pos = seq - n + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(heads):
            kh = k[lo:pos + 1, h // group].astype(np.float64)
            vh = v[lo:pos + 1, h // group].astype(np.float64)
            s = kh @ q[i, h].astype(np.float64) * scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vh
    return out


@dataclasses.dataclass
class Request:
    seq_len: int  # cached + new
    q_len: int  # new tokens this step (0 for a padding request)


def run_case(requests, *, block_size, heads, kv_heads, head_dim=8, window=None, soft_cap=None,
             pad_tokens=0, seed=0, dtype=np.float32):
    """Build the paged cache (random block order, noise everywhere else), write the step's k/v
    with write_kv_reference, run the reference, and compare with dense_attention."""
    rng = np.random.default_rng(seed)
    scale = head_dim ** -0.5
    blocks_per_req = [-(-r.seq_len // block_size) for r in requests]
    max_blocks = max(max(blocks_per_req), 1) + 1  # a spare column that must be ignored
    num_blocks = 1 + sum(blocks_per_req) + 3  # null block 0 and a few unused blocks
    ids = rng.permutation(np.arange(1, num_blocks))  # each request gets scattered blocks
    # cache full of noise: a read of any slot that is not the request's shows up
    shape = (LAYERS, num_blocks, block_size, kv_heads, head_dim)
    k_cache = rng.standard_normal(shape).astype(dtype)
    v_cache = rng.standard_normal(shape).astype(dtype)

    block_tables = np.zeros((len(requests), max_blocks), np.int32)
    dense_k, dense_v, new_q = [], [], []
    slots, qsl = [], [0]
    cursor = 0
    for r, req in enumerate(requests):
        nb = blocks_per_req[r]
        table = ids[cursor:cursor + nb]
        cursor += nb
        # unused table entries point at other (real) blocks: only seq_len may be read
        block_tables[r] = rng.choice(ids, max_blocks)
        block_tables[r, :nb] = table
        k = rng.standard_normal((req.seq_len, kv_heads, head_dim)).astype(dtype)
        v = rng.standard_normal((req.seq_len, kv_heads, head_dim)).astype(dtype)
        dense_k.append(k), dense_v.append(v)
        cached = req.seq_len - req.q_len
        for p in range(cached):  # earlier steps' k/v, already in the cache
            k_cache[LAYER, table[p // block_size], p % block_size] = k[p]
            v_cache[LAYER, table[p // block_size], p % block_size] = v[p]
        for p in range(cached, req.seq_len):
            slots.append(int(table[p // block_size]) * block_size + p % block_size)
        new_q.append(rng.standard_normal((req.q_len, heads, head_dim)).astype(dtype))
        qsl.append(qsl[-1] + req.q_len)
    total = qsl[-1]
    num_tokens = total + pad_tokens
    q = np.concatenate(new_q + [rng.standard_normal((pad_tokens, heads, head_dim)).astype(dtype)])
    new_k = np.concatenate([k[r.seq_len - r.q_len:] for k, r in zip(dense_k, requests)]
                           + [rng.standard_normal((pad_tokens, kv_heads, head_dim)).astype(dtype)])
    new_v = np.concatenate([v[r.seq_len - r.q_len:] for v, r in zip(dense_v, requests)]
                           + [rng.standard_normal((pad_tokens, kv_heads, head_dim)).astype(dtype)])
    slot_mapping = np.array(slots + [0] * pad_tokens, np.int32)  # padding -> null block 0
    assert q.shape[0] == new_k.shape[0] == slot_mapping.shape[0] == num_tokens

    k_before, v_before = k_cache.copy(), v_cache.copy()
    k_out, v_out = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.int32(LAYER),
                                      jnp.asarray(new_k), jnp.asarray(new_v),
                                      jnp.asarray(slot_mapping))
    k_out, v_out = np.asarray(k_out), np.asarray(v_out)

    # the write: new k/v exactly at their slots, every other slot of every layer untouched
    # (padding tokens may only touch the null block 0)
    written = np.zeros(shape[:3], bool)
    for t in range(total):
        b, o = divmod(int(slot_mapping[t]), block_size)
        np.testing.assert_array_equal(k_out[LAYER, b, o], new_k[t])
        np.testing.assert_array_equal(v_out[LAYER, b, o], new_v[t])
        written[LAYER, b, o] = True
    untouched = ~written
    untouched[:, 0] = False
    np.testing.assert_array_equal(k_out[untouched], k_before[untouched])
    np.testing.assert_array_equal(v_out[untouched], v_before[untouched])

    seq_lens = np.array([r.seq_len for r in requests], np.int32)
    out = attention(
        jnp.asarray(q), jnp.asarray(k_out), jnp.asarray(v_out), jnp.int32(LAYER),
        jnp.asarray(np.array(qsl, np.int32)), jnp.asarray(seq_lens), jnp.asarray(block_tables),
        scale=scale, sliding_window=window, soft_cap=soft_cap)
    out = np.asarray(out)
    assert out.shape == (num_tokens, heads, head_dim)
    assert out.dtype == q.dtype
    assert np.isfinite(out).all()

    tol = 1e-5 if dtype == np.float32 else 3e-2
    for r, req in enumerate(requests):
        if req.q_len == 0:
            continue
        expected = dense_attention(new_q[r], dense_k[r], dense_v[r], scale=scale, window=window,
                                   soft_cap=soft_cap)
        got = out[qsl[r]:qsl[r + 1]].astype(np.float64)
        np.testing.assert_allclose(
            got, expected, rtol=0, atol=tol,
            err_msg=f"request {r} (seq_len {req.seq_len}, q_len {req.q_len})")
    # padding tokens: exactly zero
    assert (out[total:] == 0).all()
    return out


MIXED = [Request(9, 1), Request(23, 23), Request(17, 5), Request(1, 1), Request(12, 1),
         Request(30, 8)]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_mixed_batch_matches_dense(kv_heads, block_size):
    """Decodes (q_len 1), full prefills, chunks on top of cached KV, in mixed order, with
    partial last blocks and scattered block tables."""
    run_case(MIXED, block_size=block_size, heads=4, kv_heads=kv_heads, seed=block_size + kv_heads)


def test_full_prefill_only():
    run_case([Request(13, 13), Request(8, 8), Request(3, 3)], block_size=4, heads=4, kv_heads=2)


def test_decode_only():
    run_case([Request(n, 1) for n in (1, 4, 5, 16, 33)], block_size=4, heads=8, kv_heads=2)


def test_chunk_on_top_of_cache_crossing_blocks():
    # 6 new tokens at positions 10..15 span blocks 2 and 3 of size 4
    run_case([Request(16, 6), Request(11, 7)], block_size=4, heads=4, kv_heads=4)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_sliding_window(window):
    run_case(MIXED, block_size=4, heads=4, kv_heads=2, window=window, seed=window)


def test_sliding_window_changes_the_result():
    """The window matters for the long requests (so the test above can fail)."""
    a = run_case(MIXED, block_size=4, heads=4, kv_heads=2, window=3, seed=7)
    b = run_case(MIXED, block_size=4, heads=4, kv_heads=2, window=None, seed=7)
    assert np.abs(a - b).max() > 0.1


def test_soft_cap():
    run_case(MIXED, block_size=4, heads=4, kv_heads=2, soft_cap=2.0, seed=3)


def test_padding_requests_and_tokens_give_zeros_not_nan():
    """Trailing padding requests (seq_len 0, no tokens) and padding tokens past the last
    request: zeros out, no NaN, and the real requests are unaffected."""
    reqs = [Request(5, 1), Request(9, 9), Request(0, 0), Request(0, 0)]
    out = run_case(reqs, block_size=4, heads=4, kv_heads=2, pad_tokens=6, seed=11)
    assert out.shape[0] == 1 + 9 + 6
    assert (out[10:] == 0).all()


def test_all_padding_step():
    """A step with no real tokens at all (only padding) is all zeros."""
    out = run_case([Request(0, 0), Request(0, 0)], block_size=4, heads=2, kv_heads=1,
                   pad_tokens=8)
    assert (out == 0).all()


def test_bfloat16_inputs():
    run_case(MIXED[:4], block_size=4, heads=4, kv_heads=2, dtype=jnp.bfloat16)


def test_token_positions():
    qsl = jnp.asarray([0, 1, 4, 4, 6], jnp.int32)  # request 2 has no tokens
    seq_lens = jnp.asarray([7, 3, 0, 10], jnp.int32)
    req, pos, valid = token_positions(qsl, seq_lens, 8)
    assert np.asarray(req)[:6].tolist() == [0, 1, 1, 1, 3, 3]
    assert np.asarray(pos)[:6].tolist() == [6, 0, 1, 2, 8, 9]
    assert np.asarray(valid).tolist() == [True] * 6 + [False] * 2


def test_layers_are_independent():
    """The reference reads only the requested layer of the stacked cache (run eagerly)."""
    rng = np.random.default_rng(0)
    block_size, heads, d = 4, 2, 8
    k = rng.standard_normal((3, 4, block_size, heads, d)).astype(np.float32)
    v = rng.standard_normal((3, 4, block_size, heads, d)).astype(np.float32)
    q = rng.standard_normal((5, heads, d)).astype(np.float32)
    args = (jnp.asarray(np.array([0, 5], np.int32)), jnp.asarray(np.array([7], np.int32)),
            jnp.asarray(np.array([[2, 1]], np.int32)))
    outs = []
    for layer in range(3):
        outs.append(np.asarray(ragged_paged_attention_reference(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), layer, *args, scale=0.3)))
        dense_k = k[layer][[2, 1]].reshape(8, heads, d)[:7]
        dense_v = v[layer][[2, 1]].reshape(8, heads, d)[:7]
        np.testing.assert_allclose(outs[-1], dense_attention(q, dense_k, dense_v, scale=0.3),
                                   atol=1e-5)
    assert np.abs(outs[0] - outs[1]).max() > 0.1
