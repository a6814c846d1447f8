"""Request: one sequence's token ids, status and KV bookkeeping, as the scheduler sees it.

A request owns no device memory. It records how far its KV cache has been computed
(`num_computed_tokens`), which blocks hold that cache (`block_ids`, filled by the
`KVCacheManager`), and the chained hashes of its full blocks (`block_hashes`, for prefix
caching). `sampling_params` is duck-typed: the scheduler reads `max_tokens`, `min_tokens`,
`stop_token_ids` and `ignore_eos`, and for multi-step decoding the fields
`sampler.plain_params` reads.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Finished states sort after the live ones."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # lost its blocks; back in the waiting queue to be recomputed
    FINISHED_STOPPED = 3  # eos, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5  # cancelled by the user or the server

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> Optional[str]:
        """The OpenAI/vLLM `finish_reason` string, None while the request is live."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)  # identity semantics: requests live in sets, dicts and queues
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    eos_token_id: Optional[int] = None
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0  # lower value is scheduled earlier under the "priority" policy (as vLLM)

    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache. It catches up with num_tokens step by step; a
    # preemption resets it to 0 and the prompt plus the outputs so far are recomputed.
    num_computed_tokens: int = 0
    # KV blocks in position order: token at position p lives in block_ids[p // block_size].
    block_ids: list[int] = field(default_factory=list)
    # Scheduled in steps still in flight (see Scheduler: asynchronous scheduling): tokens
    # being computed, and outputs being sampled whose ids the host does not know yet.
    num_inflight_tokens: int = 0
    num_pending_outputs: int = 0
    # Prefix-cache hit (tokens) found when first scheduled; -1 until then.
    num_cached_tokens: int = -1
    status: RequestStatus = RequestStatus.WAITING
    # The stop token id that finished the request (None for eos), or the stop string the
    # detokenizer matched.
    stop_reason: Union[int, str, None] = None
    # Chained hashes of the request's full blocks, grown lazily by the KVCacheManager.
    # They depend only on token ids, so they survive preemption.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        # Kept as one list (not prompt + output on demand): the runner slices it every step.
        self._all_token_ids: list[int] = self.prompt_token_ids + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only by convention: use append_output_token."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> Optional[int]:
        return getattr(self.sampling_params, "max_tokens", None)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def truncate_output(self, num_dropped: int) -> None:
        """Drop the last `num_dropped` output tokens (sampled past a stop string that the
        detokenizer found, in a multi-step decode)."""
        if num_dropped > 0:
            del self.output_token_ids[-num_dropped:]
            del self._all_token_ids[-num_dropped:]

    def append_output_token(self, token_id: int) -> None:
        token_id = int(token_id)
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def append_output_tokens(self, token_ids: list[int]) -> None:
        """Append several output tokens (Python ints, as a device result's `tolist()`)."""
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
