"""The CPU attention of pallas_kernels/block_pairs.py: its work lists (sizes, host vs traced
builder, padding) and its output against the jnp reference with the engine's host plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_pairs import (TILE, block_pair_attention, build_plan,
                                        compile_sizes, host_plan, padded_size, plan_fits,
                                        plan_sizes)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

BLOCK, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 8, 6, 2, 16, 2


def random_step(rng, requests, num_tokens, num_reqs, max_blocks, num_blocks=96):
    """[(seq_len, q_len)] -> numpy qsl, seq_lens, block tables (shuffled blocks) + q, caches."""
    ids = rng.permutation(np.arange(1, num_blocks))
    tables = np.full((num_reqs, max_blocks), num_blocks + 5, np.int32)  # garbage past the end
    seq_lens = np.zeros(num_reqs, np.int32)
    qsl = np.zeros(num_reqs + 1, np.int32)
    used = 0
    for r, (seq_len, q_len) in enumerate(requests):
        n = -(-seq_len // BLOCK)
        tables[r, :n] = ids[used:used + n]
        used += n
        seq_lens[r], qsl[r + 1] = seq_len, qsl[r] + q_len
    qsl[len(requests) + 1:] = qsl[len(requests)]
    cache = (LAYERS, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    q = rng.standard_normal((num_tokens, HEADS, HEAD_DIM)).astype(np.float32)
    k, v = (rng.standard_normal(cache).astype(np.float32) for _ in range(2))
    return qsl, seq_lens, tables, q, k, v


def counted_sizes(requests):
    """plan_sizes by plain loops: one pair per (request, block) of the last token; tiles of
    the other tokens; one pair per (tile, block up to the tile's last position)."""
    na = nt = nb = 0
    for seq_len, q_len in requests:
        if q_len == 0:
            continue
        na += -(-seq_len // BLOCK)
        first = seq_len - q_len
        for start in range(0, q_len - 1, TILE):
            nt += 1
            last = first + min(start + TILE, q_len - 1) - 1
            nb += last // BLOCK + 1
    return na, nt, nb


CASES = [
    [(20, 1), (23, 23), (17, 5), (1, 1), (12, 1), (40, 8)],  # mixed, chunks on cached KV
    [(9, 1)] * 7,  # decode only
    [(37, 37)],  # one prefill crossing tiles and blocks
    [(16, 16), (33, 17), (0, 0), (8, 2)],  # an empty request in the middle
]


@pytest.mark.parametrize("requests", CASES)
def test_plan_sizes_count_the_work(requests):
    rng = np.random.default_rng(0)
    qsl, seq_lens, tables, *_ = random_step(rng, requests, 64, 8, 8)
    assert plan_sizes(qsl, seq_lens, BLOCK) == counted_sizes(requests)


@pytest.mark.parametrize("requests", CASES)
@pytest.mark.parametrize("window,soft_cap", [(None, None), (10, None), (None, 5.0)])
def test_host_plan_matches_reference(requests, window, soft_cap):
    rng = np.random.default_rng(len(requests))
    qsl, seq_lens, tables, q, k, v = random_step(rng, requests, 64, 8, 8)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 1, jnp.asarray(qsl),
            jnp.asarray(seq_lens), jnp.asarray(tables))
    kw = dict(scale=HEAD_DIM ** -0.5, sliding_window=window, soft_cap=soft_cap)
    expected = np.asarray(ragged_paged_attention_reference(*args, **kw))
    plan = jax.tree.map(jnp.asarray, host_plan(qsl, seq_lens, tables, 64, BLOCK))
    got = np.asarray(block_pair_attention(*args, **kw, plan=plan))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    total = qsl[-1]
    assert (got[total:] == 0).all()


def test_traced_builder_equals_host_builder():
    rng = np.random.default_rng(3)
    requests = CASES[0]
    qsl, seq_lens, tables, *_ = random_step(rng, requests, 64, 8, 8)
    sizes = tuple(n + 5 for n in plan_sizes(qsl, seq_lens, BLOCK))  # with padding entries
    host = build_plan(np, qsl, seq_lens, tables, num_tokens=64, block_size=BLOCK, sizes=sizes)
    traced = jax.jit(lambda a, b, c: build_plan(jnp, a, b, c, num_tokens=64, block_size=BLOCK,
                                                sizes=sizes))(qsl, seq_lens, tables)
    for h, t in zip(jax.tree.leaves(host), jax.tree.leaves(traced)):
        np.testing.assert_array_equal(h, np.asarray(t))
    # padding pairs point at the null block and at the row past the end
    assert (host.a_block[-5:] == 0).all() and (host.a_row[-5:] == 8).all()
    assert (host.b_tile[-5:] == sizes[1]).all()


def test_padded_size():
    sizes = [padded_size(n) for n in range(0, 2000)]
    assert sizes[0] == 0 and padded_size(3, 1) == 3 and padded_size(5, 1) == 6
    assert all(s >= n for n, s in enumerate(sizes))
    assert all(s <= max(16, 1.5 * n) for n, s in enumerate(sizes) if n)
    assert sorted(set(sizes[17:])) == [24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                                       1536, 2048]


def test_compiled_sizes_fit_the_step_and_reuse_is_bounded():
    for na in range(0, 300, 7):
        for nt in (0, 1, 2, 5, 9, 17, 33):
            nb = 0 if nt == 0 else nt * 3 + na % 50
            sizes = (na, nt, nb)
            compiled = compile_sizes(sizes)
            assert plan_fits(sizes, compiled), (sizes, compiled)
            assert all(c >= n for c, n in zip(compiled, sizes))
    assert not plan_fits((100, 0, 0), (160, 0, 0))  # a decode pads at most 1.5x
    assert plan_fits((100, 0, 0), (148, 0, 0)) and plan_fits((10, 0, 0), (48, 0, 0))
    assert not plan_fits((100, 0, 0), (96, 0, 0))  # never smaller
    assert not plan_fits((100, 2, 40), (100, 0, 0)) and not plan_fits((100, 0, 0), (100, 2, 40))


def test_engine_reuses_programs_across_plan_sizes(zoo):
    """Decodes whose work shrinks as requests finish run padded on the programs compiled
    while they were longer, instead of compiling a program per size."""
    from jaxvllm import LLM, SamplingParams

    llm = LLM(zoo.case("llama_gqa").path, attention_backend="xla", max_num_seqs=8, block_size=4)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (40, 40, 40, 40)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0) for m in (4, 8, 12, 16)]
    llm.generate(prompts, params, use_tqdm=False)
    runner = llm.llm_engine.runner
    sizes = [key.plan_sizes for key in runner._programs]
    decode = [key for key in runner._programs if key.plan_sizes[1] == 0]
    # last-row pairs go 4 x 11..14 blocks, then 3, 2, 1 requests: one or two programs per
    # token bucket (4 and 3 requests share one), not one per size
    per_bucket = {T: [k.plan_sizes for k in decode if k.num_tokens == T]
                  for T in {k.num_tokens for k in decode}}
    assert all(1 <= len(s) <= 2 for s in per_bucket.values()), per_bucket
    assert len(sizes) == runner.num_compiled
