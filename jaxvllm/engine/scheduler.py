"""Token-budget scheduler: who runs in the next step, and with how many tokens.

There is no prefill phase and no decode phase. Every request has `num_tokens` (prompt plus
output so far) and `num_computed_tokens` (tokens whose KV is cached); each step hands out a
budget of `max_num_batched_tokens`, and each scheduled request's `num_computed_tokens`
catches up with its `num_tokens` by as much as the budget allows. A new prompt, a chunk of a
long prompt, a recomputation after preemption and a one-token decode are all the same thing:
a request with some tokens left to compute. When the last one is computed the model's logits
for it give the next token, which makes `num_tokens` one larger again.

A prompt chunk cut short by the budget is cut a little shorter, so that the step's token
count is a power of two (a token bucket): the runner pads every step up to its bucket, and the
tokens past a bucket would make the step as costly as the next, twice larger, one.

A step may be scheduled while the previous one is still on the device (asynchronous
scheduling): a request's tokens in flight (`num_inflight_tokens`) count as computed, and the
output each in-flight row samples (`num_pending_outputs`) as a token whose id the runner takes
from the device; a request that its pending outputs bring to max_tokens or max_model_len is
not scheduled again. `update_from_output` folds each step in, in order.

Multi-step decoding (`schedule(num_steps=K)`, vLLM's multi-step scheduling): when every
running request is decoding, nothing else could join the batch and every row's params need
no token history on the host, one step runs up to K decode steps on the device, each
sampling the next one's input. A row gets up to K steps (fewer when max_tokens or
max_model_len come first) and the blocks for them ahead; `update_from_output` appends its
tokens in order up to the first that stops it. The next multi-step decode may be scheduled
while one is in flight (`schedule_multi_step`): its rows start past the tokens in flight.

Running requests go first, in admission order; then waiting ones (FCFS, or by priority).
When the KV cache runs out of blocks, the scheduler preempts from the tail of the running
list (the newest, or the lowest priority) by recompute: the victim drops its blocks and goes
back to the front of the waiting queue, keeping the tokens it has generated.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

from jaxvllm.engine.kv_cache import KVCacheManager
from jaxvllm.engine.request import Request, RequestStatus
from jaxvllm.engine.sampler import all_plain


# The runner pads a step's token count up to a power of two, at least this.
MIN_TOKEN_BUCKET = 16


def token_bucket_floor(num_tokens: int) -> int:
    """The largest token bucket (a power of two >= MIN_TOKEN_BUCKET) <= num_tokens; 0 if none."""
    if num_tokens < MIN_TOKEN_BUCKET:
        return 0
    return 1 << (num_tokens.bit_length() - 1)


def bucket_aligned_grant(granted: int, num_scheduled: int) -> int:
    """A budget-truncated grant of `granted` tokens, after `num_scheduled` tokens already in the
    step, trimmed so that the step's total is a token bucket; unchanged if that leaves none."""
    total = num_scheduled + granted
    trimmed = granted - (total - token_bucket_floor(total))
    return trimmed if trimmed >= 1 else granted


@dataclass
class SchedulerConfig:
    max_num_seqs: int  # requests running at once (rows of a step)
    max_num_batched_tokens: int  # token budget of one step (length of the ragged batch)
    max_model_len: int  # prompt + output never exceed this
    policy: str = "fcfs"  # "fcfs" or "priority" (lower `priority` value first, as vLLM)
    enable_chunked_prefill: bool = True  # split prompts longer than the remaining budget

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy={self.policy!r}: expected 'fcfs' or 'priority'")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len}: without chunked prefill a long prompt "
                "could never be scheduled")


@dataclass
class ScheduledRequest:
    """One row of a step."""

    # The request itself, for its token ids and sampling params, which the runner reads when
    # the step is dispatched (a step scheduled ahead may grow its blocks and outputs later).
    request: Request
    # Tokens to compute this step: all_token_ids[num_computed_tokens:][:num_new_tokens], the
    # last one possibly not on the host yet (sampled by the step in flight; see token_ids).
    # In a multi-step decode (SchedulerOutput.num_steps > 1): the decode steps this row runs,
    # the first on its last known token, each later one on the token the one before sampled.
    num_new_tokens: int
    # Position of the first new token; the request's own field moves on in update_from_output.
    num_computed_tokens: int
    # The block table for this step, covering num_computed_tokens + num_new_tokens tokens.
    block_ids: list[int]
    # True when this step reaches the end of the sequence, so its last logits give a token.
    # False for a prompt (or recomputation) chunk that stops short: nothing is sampled.
    do_sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The new tokens the host knows: one short of num_new_tokens for a row whose last
        token the step in flight samples."""
        start = self.num_computed_tokens
        return self.request.all_token_ids[start:start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    # The batch, in row order: running requests first, then newly admitted ones.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Sum of num_new_tokens: the length of the ragged token batch (before bucket padding).
    num_scheduled_tokens: int = 0
    # Requests that lost their blocks this step; a runner keeping per-request state drops it.
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests finished or aborted since the previous schedule(): likewise dropped by the runner.
    finished_req_ids: set[str] = field(default_factory=set)
    # > 1: a multi-step decode of at most this many steps per row (see the module docstring)
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _WaitingQueue:
    """Requests waiting for admission: FIFO, or a heap on (priority, arrival_time)."""

    def __init__(self, policy: str):
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()  # tie-break: insertion order

    def __len__(self) -> int:
        return len(self._fifo) if self.policy == "fcfs" else len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        if self.policy == "fcfs":
            return iter(self._fifo)
        return (entry[-1] for entry in sorted(self._heap))

    def add(self, req: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            self._fifo.appendleft(req) if front else self._fifo.append(req)
        else:
            # A preempted request keeps its (priority, arrival) key, which already puts it
            # ahead of everything that arrived after it at its priority.
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))

    def peek(self) -> Request:
        return self._fifo[0] if self.policy == "fcfs" else self._heap[0][-1]

    def pop(self) -> Request:
        return self._fifo.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[-1]

    def remove(self, req: Request) -> None:
        if self.policy == "fcfs":
            self._fifo.remove(req)
        else:
            self._heap = [entry for entry in self._heap if entry[-1] is not req]
            heapq.heapify(self._heap)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        usable = (kv_manager.num_blocks - 1) * kv_manager.block_size
        if usable < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {usable} tokens ({kv_manager.num_blocks - 1} blocks of "
                f"{kv_manager.block_size}), fewer than max_model_len={config.max_model_len}: "
                "one long request could never run")
        self.config = config
        self.kv_manager = kv_manager
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.waiting = _WaitingQueue(config.policy)
        self.running: list[Request] = []  # admission order; preemption takes from the tail
        self.num_preemptions = 0
        self._finished_req_ids: set[str] = set()  # since the last schedule()

    # -- queues ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id!r}: the prompt is empty")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(f"request {request.request_id!r}: {request.num_tokens} tokens exceed "
                             f"max_model_len={self.config.max_model_len}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: Union[str, Iterable[str]],
                        finished_status: RequestStatus) -> list[Request]:
        """Finish requests from outside (abort, or a stop string found by the detokenizer).

        Frees their blocks and takes them out of the queues. Unknown or already finished ids
        are ignored. Returns the requests finished by this call.
        """
        if not finished_status.is_finished:
            raise ValueError(f"{finished_status!r} is not a finished status")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = finished_status
            self._free_request(req)
            done.append(req)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request_counts(self) -> tuple[int, int]:
        """(running, waiting), as vLLM's scheduler."""
        return len(self.running), len(self.waiting)

    # -- the step ----------------------------------------------------------------------------

    def schedule(self, num_steps: int = 1) -> SchedulerOutput:
        """The next step's batch: a multi-step decode of up to `num_steps` steps per row where
        the batch allows one (see the module docstring), else one step."""
        if num_steps > 1 and (out := self.schedule_multi_step(num_steps)) is not None:
            return out
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        num_new: dict[Request, int] = {}  # scheduled this step, in batch order
        start: dict[Request, int] = {}
        preempted: list[Request] = []

        # 1. Running requests: each wants the rest of its tokens, capped by the budget.
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.num_pending_outputs and self._finishes_on_length(req):
                continue  # its last token is being sampled
            computed = req.num_computed_tokens + req.num_inflight_tokens
            wanted = min(req.num_tokens + req.num_pending_outputs - computed,
                         cfg.max_model_len - computed)
            if wanted <= 0:
                continue
            n, cost = self._grant(wanted, budget)
            while True:
                if self.kv_manager.allocate_slots(req, req.num_inflight_tokens + n) is not None:
                    num_new[req] = n
                    start[req] = computed
                    budget -= cost
                    break
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.append(victim)
                if victim in num_new:  # possible under "priority": give its tokens back
                    budget += num_new.pop(victim)
                    del start[victim]
                if victim is req:
                    break

        # 2. Waiting requests, in queue order, while budget, rows and blocks allow. Not after a
        # preemption: blocks are short, and the victims would be readmitted at once.
        while (not preempted and budget > 0 and self.waiting
               and len(self.running) < cfg.max_num_seqs):
            req = self.waiting.peek()
            hits, num_cached = self.kv_manager.get_computed_blocks(req)
            wanted = req.num_tokens - num_cached
            if wanted > budget and not cfg.enable_chunked_prefill:
                break  # no skipping ahead: it goes first when the budget is whole again
            n, cost = self._grant(wanted, budget)
            if self.kv_manager.allocate_slots(req, n, hits) is None:
                break
            self.waiting.pop()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_new[req] = n
            start[req] = num_cached
            budget -= cost

        out = SchedulerOutput(preempted_req_ids=[r.request_id for r in preempted],
                              finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        for req, n in num_new.items():
            do_sample = start[req] + n == req.num_tokens + req.num_pending_outputs
            out.scheduled.append(ScheduledRequest(req, n, start[req], list(req.block_ids),
                                                  do_sample))
            out.num_scheduled_tokens += n
            req.num_inflight_tokens += n
            req.num_pending_outputs += do_sample
        return out

    def multi_step_batch(self) -> bool:
        """Whether the running batch may take a multi-step decode once its steps in flight
        are folded in: some request runs, every one will then be decoding (its prompt
        computed, only its last token not), none waiting could join, and every one's params
        need no token history on the host."""
        if not self.running or (self.waiting and len(self.running) < self.config.max_num_seqs):
            return False
        return all(req.num_computed_tokens + req.num_inflight_tokens
                   == req.num_tokens + req.num_pending_outputs - 1
                   for req in self.running) and all_plain(self.running)

    def schedule_multi_step(self, num_steps: int) -> Optional[SchedulerOutput]:
        """A multi-step decode of every running request, or None where the batch does not
        allow one: a request not decoding (a prompt, a prompt chunk in flight), params that
        need token history on the host, a waiting request that could be admitted, too few
        free blocks for the steps ahead.

        A multi-step decode in flight may be followed by the next before it is collected
        (pipelined): each row then starts past the tokens in flight, on the last one (which
        the runner reads on the device), and a row they bring to max_tokens or max_model_len
        is left out."""
        if not self.multi_step_batch():
            return None
        rows = []
        for req in self.running:
            left = self._room(req, req.num_pending_outputs)
            if left <= 0:
                continue  # its last token is being sampled
            rows.append((req, min(num_steps, left)))
        if not rows:
            return None
        bs = self.kv_manager.block_size
        # new blocks per row: its last step's position is num_tokens + pending - 2 + n
        new_blocks = [max(-(-(req.num_tokens + req.num_pending_outputs - 1 + n) // bs)
                          - len(req.block_ids), 0) for req, n in rows]
        if sum(new_blocks) > self.kv_manager.num_free_blocks:
            return None
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids, num_steps=num_steps)
        self._finished_req_ids = set()
        for (req, n), wanted in zip(rows, new_blocks):
            if wanted and self.kv_manager.allocate_slots(req, req.num_inflight_tokens + n) is None:
                raise RuntimeError(f"no blocks for {req.request_id!r}'s steps ahead")  # counted
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens
                                                  + req.num_inflight_tokens,
                                                  list(req.block_ids), True))
            out.num_scheduled_tokens += n
            req.num_inflight_tokens += n
            req.num_pending_outputs += n  # a token sampled per step
        return out

    def update_from_output(self, output: SchedulerOutput,
                           sampled_token_ids: dict[str, Union[int, list[int]]]) -> list[Request]:
        """Fold a step's results back in; returns the requests this step finished.

        `sampled_token_ids` maps request id -> the sampled token, for the rows with
        `do_sample` (in a multi-step decode, the list of the row's tokens: they are appended
        in order up to the first that stops the request); other entries are ignored.
        """
        finished = []
        for s in output.scheduled:
            req = s.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted or preempted since schedule(): its blocks are gone
            req.num_inflight_tokens -= s.num_new_tokens
            stopped = False
            if output.num_steps > 1:
                req.num_pending_outputs -= s.num_new_tokens
                stopped = self._append_until_stop(
                    req, sampled_token_ids[req.request_id][:s.num_new_tokens])
            else:
                req.num_computed_tokens += s.num_new_tokens
                if s.do_sample:
                    req.num_pending_outputs -= 1
                    req.append_output_token(sampled_token_ids[req.request_id])
                    stopped = self._check_stop(req)
            self.kv_manager.cache_blocks(req, req.num_computed_tokens)
            if stopped:
                self.running.remove(req)
                self._free_request(req)
                finished.append(req)
        return finished

    # -- helpers -----------------------------------------------------------------------------

    def _grant(self, wanted: int, budget: int) -> tuple[int, int]:
        """(tokens granted, budget they use up) for a request wanting `wanted` more tokens.

        A grant cut short by the budget is trimmed so that the step ends on a token bucket and
        uses up the rest of the budget: nothing else may join the step and pass the bucket.
        """
        if wanted <= budget:
            return wanted, wanted
        return bucket_aligned_grant(budget, self.config.max_num_batched_tokens - budget), budget

    def _room(self, req: Request, pending: int) -> int:
        """Output tokens `req` may still get after its outputs so far and `pending` more,
        as max_model_len and max_tokens allow (<= 0: they finish it by length)."""
        room = self.config.max_model_len - req.num_tokens - pending
        if req.max_tokens is not None:
            room = min(room, req.max_tokens - req.num_output_tokens - pending)
        return room

    def _finishes_on_length(self, req: Request) -> bool:
        """Whether the outputs being sampled finish `req` by length (max_tokens or
        max_model_len), whatever their ids."""
        return self._room(req, req.num_pending_outputs) <= 0

    def _append_until_stop(self, req: Request, tokens: list[int]) -> bool:
        """Append a multi-step row's tokens (their KV computed) up to the first that stops
        the request; whether one did. As `_check_stop` after each token, in one go where
        none is an eos or stop token id (then only length can stop it; min_tokens holds
        back only those)."""
        params = req.sampling_params
        stops = set(getattr(params, "stop_token_ids", None) or ())
        if not getattr(params, "ignore_eos", False) and req.eos_token_id is not None:
            stops.add(req.eos_token_id)
        if stops and not stops.isdisjoint(tokens):
            for token in tokens:
                req.num_computed_tokens += 1
                req.append_output_token(token)
                if self._check_stop(req):
                    return True
            return False
        room = self._room(req, 0)
        kept = tokens[:room]
        req.append_output_tokens(kept)
        req.num_computed_tokens += len(kept)
        if len(kept) < room:
            return False
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True

    def _check_stop(self, req: Request) -> bool:
        """Stop conditions after appending a sampled token, in vLLM V1's order (check_stop).

        Length first: a token that is both the max_tokens-th and eos reports "length".
        Stop strings are the detokenizer's business (it calls finish_requests).
        """
        params = req.sampling_params
        if self._room(req, 0) <= 0:
            req.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        # The sampler should mask eos and stop tokens before min_tokens; this guards the host side.
        if req.num_output_tokens < (getattr(params, "min_tokens", 0) or 0):
            return False
        token = req.output_token_ids[-1]
        if not getattr(params, "ignore_eos", False) and token == req.eos_token_id:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = None
            return True
        if token in (getattr(params, "stop_token_ids", None) or ()):
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
            return True
        return False

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: drop the KV; prompt and outputs so far are computed again."""
        self.running.remove(req)
        self.kv_manager.free(req)
        req.num_computed_tokens = 0
        # what its steps in flight compute and sample is dropped (update_from_output skips it)
        req.num_inflight_tokens = req.num_pending_outputs = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.add(req, front=True)
        self.num_preemptions += 1

    def _free_request(self, req: Request) -> None:
        self.kv_manager.free(req)
        del self.requests[req.request_id]
        self._finished_req_ids.add(req.request_id)

    def iter_waiting(self) -> Iterator[Request]:
        """Waiting requests in admission order (for stats and tests)."""
        return iter(self.waiting)

    def get_request(self, request_id: str) -> Optional[Request]:
        return self.requests.get(request_id)
