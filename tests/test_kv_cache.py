"""KVCacheManager / BlockPool: allocation, ref counts, prefix caching, eviction order."""

from __future__ import annotations

import pytest

try:
    from conftest import FakeSamplingParams
except ImportError:  # tests/ imported as a package
    from tests.conftest import FakeSamplingParams
from jaxvllm.engine.kv_cache import NULL_BLOCK_ID, BlockPool, KVCacheManager
from jaxvllm.engine.request import Request, RequestStatus

BS = 4

_ids = iter(range(10**9))


def make_request(tokens, rid=None) -> Request:
    return Request(rid or f"r{next(_ids)}", list(tokens), FakeSamplingParams())


def admit(kv: KVCacheManager, req: Request) -> list[int]:
    """What the scheduler does for a waiting request: prefix hits, then the rest."""
    hits, num_cached = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_cached, hits) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_computed_tokens)
    return hits


def assert_all_free(kv: KVCacheManager) -> None:
    pool = kv.block_pool
    assert kv.num_free_blocks == kv.num_blocks - 1
    assert kv.usage == 0.0
    assert all(pool.blocks[b].ref_cnt == 0 for b in range(1, kv.num_blocks))
    assert sorted(pool.free_block_ids) == list(range(1, kv.num_blocks))


def test_request_basics():
    req = make_request([1, 2, 3])
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (3, 3, 0)
    req.append_output_token(7)
    assert req.all_token_ids == [1, 2, 3, 7] and req.output_token_ids == [7]
    assert req.prompt_token_ids == [1, 2, 3] and req.num_tokens == 4
    assert req.num_cached_tokens == -1 and req.status == RequestStatus.WAITING
    assert not RequestStatus.PREEMPTED.is_finished and RequestStatus.FINISHED_ABORTED.is_finished
    assert RequestStatus.FINISHED_LENGTH_CAPPED.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None


def test_null_block_never_handed_out():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    assert NULL_BLOCK_ID not in blocks and sorted(blocks) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert NULL_BLOCK_ID not in pool.free_block_ids
    with pytest.raises(ValueError):
        BlockPool(1)


def test_alloc_free_round_trip_and_no_partial_allocation():
    kv = KVCacheManager(num_blocks=9, block_size=BS, enable_prefix_caching=False)
    a, b = make_request(range(10)), make_request(range(100, 120))
    assert kv.allocate_slots(a, 10) == a.block_ids and len(a.block_ids) == 3
    assert kv.usage == pytest.approx(3 / 8)
    assert len(kv.allocate_slots(b, 20)) == 5
    assert kv.num_free_blocks == 0
    assert NULL_BLOCK_ID not in a.block_ids + b.block_ids
    # No room: None, and nothing changed.
    c = make_request(range(5))
    assert kv.allocate_slots(c, 5) is None
    assert c.block_ids == [] and kv.num_free_blocks == 0
    # Growing inside the last block needs nothing new.
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2) == []
    assert kv.allocate_slots(a, 3) is None and len(a.block_ids) == 3
    kv.free(a)
    kv.free(b)
    assert a.block_ids == [] and b.block_ids == []
    assert_all_free(kv)


def test_prefix_hit_on_shared_prefix_full_blocks_only():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    a = make_request(range(10))  # two full blocks + 2 tokens
    admit(kv, a)
    assert kv.block_pool.num_cached_blocks == 2  # the partial third block is not cached

    b = make_request(list(range(9)) + [99, 98, 97])  # shares 9 tokens: 2 full blocks
    hits, n = kv.get_computed_blocks(b)
    assert hits == a.block_ids[:2] and n == 8

    # Exactly the cached 8 tokens as a prompt: the last token must be computed, so only 1 block.
    c = make_request(range(8))
    hits, n = kv.get_computed_blocks(c)
    assert hits == a.block_ids[:1] and n == 4

    # Chained hashes: the same second block after a different first block is no hit.
    d = make_request([50, 51, 52, 53] + list(range(4, 10)))
    assert kv.get_computed_blocks(d) == ([], 0)

    # Each block is cached, but not after this parent: [P2 | Q] misses Q, which follows P in a.
    e = make_request([60, 61, 62, 63, 64, 65, 66, 67, 68])
    admit(kv, e)
    f = make_request([60, 61, 62, 63, 4, 5, 6, 7, 8])
    assert kv.get_computed_blocks(f) == (e.block_ids[:1], 4)

    kv.free(a)
    kv.free(e)
    assert_all_free(kv)  # cached blocks count as free (evictable)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8  # still cached after a finished


def test_ref_counts_with_two_requests_sharing_a_prefix():
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    pool = kv.block_pool
    a = make_request(range(13))
    admit(kv, a)
    b = make_request(list(range(12)) + [77, 78])
    free_before = kv.num_free_blocks
    hits = admit(kv, b)
    assert hits == a.block_ids[:3] and b.block_ids[:3] == hits
    assert b.num_tokens == 14 and len(b.block_ids) == 4
    assert kv.num_free_blocks == free_before - 1  # only one new block for b
    assert [pool.blocks[i].ref_cnt for i in hits] == [2, 2, 2]

    kv.free(a)
    assert [pool.blocks[i].ref_cnt for i in hits] == [1, 1, 1]
    assert not set(hits) & set(pool.free_block_ids)  # still in use by b
    kv.free(b)
    assert [pool.blocks[i].ref_cnt for i in hits] == [0, 0, 0]
    assert_all_free(kv)

    # Touching cached free blocks takes them off the free queue.
    c = make_request(range(13))
    hits, n = kv.get_computed_blocks(c)
    assert n == 12
    kv.allocate_slots(c, 1, hits)
    assert not set(hits) & set(pool.free_block_ids)
    assert kv.num_free_blocks == kv.num_blocks - 1 - 4
    kv.free(c)
    assert_all_free(kv)


def test_allocation_counts_evictable_hits_as_not_free():
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = make_request(range(16))
    admit(kv, a)
    kv.free(a)  # 4 cached free blocks (the last was filled by the 16th token)
    assert kv.block_pool.num_cached_blocks == 4 and kv.num_free_blocks == 4
    # 4 hits + 1 new block for the 17th token = 5 blocks > 4: None, and nothing changed.
    b = make_request(range(17))
    hits, n = kv.get_computed_blocks(b)
    assert n == 16
    assert kv.allocate_slots(b, 1, hits) is None
    assert b.block_ids == [] and kv.num_free_blocks == 4
    assert all(kv.block_pool.blocks[h].ref_cnt == 0 for h in hits)
    # The same 16 tokens as a prompt: 3 hits (the last token is computed) + 1 block that
    # evicts a's last cached block.
    b = make_request(range(16))
    hits, n = kv.get_computed_blocks(b)
    assert n == 12
    assert kv.allocate_slots(b, 4, hits) is not None
    assert kv.num_free_blocks == 0 and kv.block_pool.num_cached_blocks == 3
    kv.free(b)
    assert_all_free(kv)


def test_lru_eviction_order():
    kv = KVCacheManager(num_blocks=9, block_size=BS)  # 8 usable blocks
    pool = kv.block_pool
    a = make_request(range(0, 12))  # 3 full blocks
    b = make_request(range(100, 112))
    admit(kv, a)
    admit(kv, b)
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    kv.free(a)  # freed first: evicted first
    kv.free(b)
    # Unhashed free blocks first, then a's tail-to-head, then b's tail-to-head.
    order = pool.free_block_ids
    assert order[-6:] == a_blocks[::-1] + b_blocks[::-1]

    # Take 2 + 2 blocks: the 2 never-used blocks, then a's last 2 blocks (its tail).
    c = make_request(range(200, 216))
    kv.allocate_slots(c, 16)
    evicted = set(c.block_ids)
    assert set(a_blocks[1:]) <= evicted and not set(b_blocks) & evicted
    a2 = make_request(range(0, 13))
    assert kv.get_computed_blocks(a2) == (a_blocks[:1], 4)  # a's head survives
    b2 = make_request(range(100, 113))
    assert kv.get_computed_blocks(b2) == (b_blocks, 12)
    kv.free(c)
    assert_all_free(kv)


def test_output_tokens_fill_blocks_that_get_cached():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(range(6))
    admit(kv, a)
    assert kv.block_pool.num_cached_blocks == 1
    for t in (6, 7):  # decode: the 8th token's KV completes block 1
        a.append_output_token(t)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
        kv.cache_blocks(a, a.num_computed_tokens)
    assert kv.block_pool.num_cached_blocks == 2
    b = make_request(range(9))
    assert kv.get_computed_blocks(b) == (a.block_ids[:2], 8)
    kv.free(a)
    assert_all_free(kv)


def test_counters_reset_and_disabled_caching():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request(range(9))
    admit(kv, a)
    b = make_request(range(9))
    admit(kv, b)
    assert kv.prefix_cache_queries == 18 and kv.prefix_cache_hits == 8
    assert kv.prefix_cache_hit_rate == pytest.approx(8 / 18)
    kv.free(a)
    kv.free(b)
    assert kv.reset_prefix_cache() is True
    assert kv.block_pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request(range(9))) == ([], 0)
    assert_all_free(kv)

    off = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    c = make_request(range(9))
    admit(off, c)
    assert off.get_computed_blocks(make_request(range(9))) == ([], 0)
    assert off.block_pool.num_cached_blocks == 0 and off.prefix_cache_queries == 0
    off.free(c)
    assert_all_free(off)
