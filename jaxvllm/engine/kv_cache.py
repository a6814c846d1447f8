"""KV block bookkeeping on the host: which blocks a request holds, which are free, which are cached.

`BlockPool` owns every block of the paged KV array by id: a reference count, an optional
prefix hash, and a free queue that is also the eviction order. `KVCacheManager` is what the
scheduler talks to: it turns "this request needs n more tokens" into block ids, finds
prefix-cache hits for a new request, and registers blocks as they fill up.

Prefix caching works on full blocks only. A block's hash chains its parent's hash with the
block's token ids, so equal hashes mean equal whole prefixes, not just equal blocks:

    tokens  | 1 2 3 4 | 5 6 7 8 | 9 ...
    hashes    h0 = H(-, 1 2 3 4)   h1 = H(h0, 5 6 7 8)   ...

Blocks whose request finished stay in the free queue with their hash: they are handed out
again only when the queue reaches them, and until then a new request with the same prefix
takes them back out of the queue ("touch") instead of recomputing them.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Optional

from jaxvllm.engine.request import Request

# Block 0 is never handed out: padded slots of a step write into it and padded block-table
# entries point at it, so garbage lands somewhere harmless.
NULL_BLOCK_ID = 0


def hash_block_tokens(parent_hash: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: H(parent hash, the block's token ids).

    A cryptographic digest rather than Python's `hash()`: tuple hashes of ints are not
    randomized, so a server's users could craft colliding prompts and read each other's KV.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"\0")
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0  # number of live requests whose block table holds this block
        self.block_hash: Optional[bytes] = None  # set while the block is in the prefix cache

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else " cached"
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}{cached})"


class BlockPool:
    """Every KV block with its reference count, the free queue and the prefix-hash map.

    Invariants: a block is in the free queue iff its ref_cnt is 0 (block 0 excepted: never
    free, never counted). The queue's head is evicted first. Blocks without a hash are put at
    the head when freed (they hold nothing worth keeping), hashed blocks at the tail, so
    cached blocks leave in least-recently-freed order.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need the null block and at least one more")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_cnt = 1  # pinned forever
        # An ordered dict as a doubly linked list: O(1) pop at the head, push at either end,
        # and removal from the middle when a cached block is touched.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-evictable ones included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def free_block_ids(self) -> list[int]:
        """The free queue in eviction order (head first). For tests and debugging."""
        return list(self._free)

    def get_cached_block(self, block_hash: bytes) -> Optional[int]:
        return self._cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[int]:
        """Pop n blocks from the head of the free queue, evicting their cached hashes."""
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_cnt == 0, block
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (prefix hits); free ones leave the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order (it becomes eviction order)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block_id != NULL_BLOCK_ID and block.ref_cnt > 0, block
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None  # tail: evicted last
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)  # head: reused first

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register a full block under its hash. False if the hash already has a block."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            # NOTE: a concurrent request computed the same prefix; keep the first copy and
            # let this one go back to the free pool as plain memory.
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash. Blocks in use stay valid; they just are no longer shareable."""
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()


class KVCacheManager:
    """The scheduler's view of the KV cache: blocks per request, prefix hits, usage."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        # request id -> how many of its leading blocks are registered in the prefix cache
        self._num_cached_blocks: dict[str, int] = {}
        # Prefix-cache counters, in tokens (as vLLM's PrefixCacheStats): a query is a request's
        # token count at (re)admission, a hit the tokens its cached blocks covered.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        """All blocks, the null block included (the size of the device KV array)."""
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable (non-null) blocks held by live requests."""
        usable = self.block_pool.num_blocks - 1
        return (usable - self.block_pool.num_free_blocks) / usable

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of leading full blocks already in the prefix cache.

        Returns (block ids, number of tokens they cover). Never the whole sequence: the last
        token must be computed so that its logits exist, so at most (num_tokens - 1) tokens
        rounded down to full blocks. For a new request num_tokens is the prompt; a preempted
        one also gets its already generated tokens back. No side effects: hand the ids to
        `allocate_slots`, which takes the references.
        """
        if not self.enable_prefix_caching or _wants_prompt_logprobs(request):
            return [], 0  # prompt logprobs need the logits of every prompt token
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_block_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[Sequence[int]] = None) -> Optional[list[int]]:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        Call it before advancing `request.num_computed_tokens`; `new_computed_blocks` (the
        prefix hits from `get_computed_blocks`, first allocation only) count as computed. The
        request's block table grows to ceil((computed + num_new_tokens) / block_size) blocks.

        First allocation, with a prefix-cache hit (block_size 4, 8 hit + 6 new tokens)::

            | h h h h | h h h h | n n n n | n n . . |
            |<-new_computed---->|<--- new blocks -->|

        Later allocation (num_computed_tokens 10, num_new_tokens 5)::

            | c c c c | c c c c | c c n n | n n n . |
            |<---- request.block_ids --->|<- new ->|

        h: KV found in the prefix cache.   c: KV computed by earlier steps.
        n: tokens this step computes; their slots must exist.   .: empty slots.

        Returns the newly allocated block ids (hits excluded, possibly empty), or None when
        the free blocks do not suffice; then nothing has changed.
        """
        hits = list(new_computed_blocks or ())
        if hits and request.block_ids:
            raise ValueError(f"request {request.request_id!r} holds blocks: prefix hits are "
                             "for its first allocation only")
        pool = self.block_pool
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_blocks = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new = max(num_blocks - len(request.block_ids) - len(hits), 0)
        # Hits sitting in the free queue stop being free when touched.
        num_evictable_hits = sum(1 for b in hits if pool.blocks[b].ref_cnt == 0)
        if num_new > pool.num_free_blocks - num_evictable_hits:
            return None

        if self.enable_prefix_caching and not request.block_ids:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
        if hits:
            pool.touch(hits)
            request.block_ids.extend(hits)
            self._num_cached_blocks[request.request_id] = len(hits)
        new_blocks = pool.get_new_blocks(num_new)
        request.block_ids.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that `num_computed_tokens` has filled completely.

        Called after each step; blocks filled by prompt and by output tokens alike.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_full)
        for i in range(start, num_full):
            self.block_pool.cache_block(request.block_ids[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks; hashed ones stay in the free queue as evictable cache.

        Freed last block first, so that a sequence's tail is evicted before its head: the head
        is the part other requests are likely to share.
        """
        self.block_pool.free_blocks(reversed(request.block_ids))
        request.block_ids = []
        self._num_cached_blocks.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (e.g. after new weights). True, as vLLM's on success."""
        self.block_pool.reset_prefix_cache()
        return True

    def _update_block_hashes(self, request: Request, num_blocks: int) -> None:
        """Grow request.block_hashes to cover its first num_blocks full blocks."""
        hashes = request.block_hashes
        if len(hashes) >= num_blocks:
            return
        bs = self.block_size
        tokens = request.all_token_ids
        assert num_blocks * bs <= len(tokens), (num_blocks, bs, len(tokens))
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_blocks):
            parent = hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(parent)


def _wants_prompt_logprobs(request: Request) -> bool:
    return getattr(request.sampling_params, "prompt_logprobs", None) is not None
