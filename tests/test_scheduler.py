"""Scheduler: token budget, chunked prefill, admission limits, preemption, priority, stops, aborts.

A fake paged "model" stands in for the runner: it writes each step's tokens into a dict keyed
by (block id, offset) through the step's block table, reads the whole sequence back through the
same table when it samples, and returns a token that depends on that sequence alone. So a wrong
block table, a bad prefix-cache hit or a lost recomputation changes the generated tokens.
"""

from __future__ import annotations

import functools
import random

import pytest

try:
    from conftest import FakeSamplingParams
except ImportError:  # tests/ imported as a package
    from tests.conftest import FakeSamplingParams
from jaxvllm.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager
from jaxvllm.engine.request import Request, RequestStatus
from jaxvllm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 50


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What one request generates when it runs alone, with nothing cached."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class FakeModel:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[tuple[int, int], int] = {}

    def step(self, out: SchedulerOutput) -> dict[str, int]:
        bs = self.block_size
        sampled = {}
        for s in out.scheduled:
            end = s.num_computed_tokens + s.num_new_tokens
            assert NULL_BLOCK_ID not in s.block_ids
            assert len(s.block_ids) * bs >= end
            assert s.request.num_computed_tokens == s.num_computed_tokens
            for i, tok in enumerate(s.token_ids):
                p = s.num_computed_tokens + i
                self.kv[s.block_ids[p // bs], p % bs] = tok
            assert s.do_sample == (end == s.request.num_tokens)
            if s.do_sample:
                seen = [self.kv[s.block_ids[p // bs], p % bs] for p in range(end)]
                assert seen == s.request.all_token_ids[:end]
                sampled[s.request_id] = next_token(seen)
        return sampled


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   max_model_len=64, policy="fcfs", enable_chunked_prefill=True,
                   enable_prefix_caching=True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, policy=policy,
                          enable_chunked_prefill=enable_chunked_prefill)
    return Scheduler(cfg, kv)


_counter = iter(range(10**9))


def make_request(prompt, max_tokens=8, rid=None, priority=0, eos=None, arrival=None, **params):
    n = next(_counter)
    sampling = FakeSamplingParams(max_tokens=max_tokens, **params)
    return Request(rid or f"r{n}", list(prompt), sampling, eos_token_id=eos,
                   arrival_time=float(n) if arrival is None else arrival, priority=priority)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    assert out.num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_steps > 1 or out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
    assert all(s.num_new_tokens > 0 for s in out.scheduled)


def run(sched: Scheduler, model: FakeModel, on_step=None, max_steps=5000) -> list[Request]:
    finished = []
    for step in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        out = sched.schedule()
        check_step(sched, out)
        if on_step is not None:
            on_step(step, out)
        finished += sched.update_from_output(out, model.step(out))
    raise AssertionError("did not finish")


class AheadModel(FakeModel):
    """The fake model for steps scheduled ahead of the one in flight: a new token past the
    request's known ids is the one the previous step sampled for it, as the runner reads it
    on the device."""

    def __init__(self, block_size: int):
        super().__init__(block_size)
        self.last: dict[str, int] = {}  # the previous step's sampled tokens
        self.num_fed = 0  # tokens taken from the previous step

    def step(self, out: SchedulerOutput) -> dict[str, int]:
        bs = self.block_size
        sampled = {}
        for s in out.scheduled:
            req, end = s.request, s.num_computed_tokens + s.num_new_tokens
            assert len(s.block_ids) * bs >= end
            known = s.token_ids
            missing = s.num_new_tokens - len(known)
            assert missing in (0, 1), "at most one token of a request is being sampled"
            tokens = known + ([self.last[s.request_id]] if missing else [])
            self.num_fed += missing
            for i, tok in enumerate(tokens):
                p = s.num_computed_tokens + i
                self.kv[s.block_ids[p // bs], p % bs] = tok
            if s.do_sample:
                seen = [self.kv[s.block_ids[p // bs], p % bs] for p in range(end)]
                assert seen[:req.num_tokens] == req.all_token_ids[:end]
                sampled[s.request_id] = next_token(seen)
        self.last = sampled
        return sampled


def run_ahead(sched: Scheduler, model: FakeModel, on_step=None, max_steps=5000,
              multi_step: bool = False) -> list[Request]:
    """`run` with each step scheduled (and run) before the previous one is folded in.
    `multi_step` (a MultiStepModel): multi-step decodes of up to 3 steps asked for, and only
    a multi-step decode scheduled ahead of one in flight, where `schedule_multi_step` allows
    it (as the engine); other steps fold the one in flight in first."""
    finished, in_flight = [], None
    for step in range(max_steps):
        if not sched.has_unfinished_requests() and in_flight is None:
            return finished
        if not multi_step:
            out = sched.schedule()
        else:
            out = None
            if in_flight is not None and in_flight[0].num_steps > 1:
                out = sched.schedule_multi_step(3)
            if out is None:
                if in_flight is not None:
                    finished += sched.update_from_output(*in_flight)
                    in_flight = None
                out = sched.schedule(num_steps=3)
        check_step(sched, out)
        if on_step is not None:
            on_step(step, out)
        result = model.step(out)
        if in_flight is not None:
            finished += sched.update_from_output(*in_flight)
        in_flight = (out, result) if out.scheduled else None
    raise AssertionError("did not finish")


class MultiStepModel(FakeModel):
    """The fake model for multi-step decodes as well: a row of a multi-step output runs its
    `num_new_tokens` decode steps, each writing the token the one before sampled. A row
    scheduled past its known tokens (ahead of the call in flight) starts on that call's
    last token for it, as the runner reads it on the device."""

    def __init__(self, block_size: int):
        super().__init__(block_size)
        self.num_fed = 0  # tokens fed from the same call's previous step
        self.num_fed_ahead = 0  # first tokens fed from the previous call
        self.last: dict[str, int] = {}  # the previous call's last token of each row

    def step(self, out: SchedulerOutput) -> dict:
        if out.num_steps == 1:
            self.last = {}
            return super().step(out)
        bs = self.block_size
        sampled = {}
        for s in out.scheduled:
            req, start = s.request, s.num_computed_tokens
            assert s.do_sample and s.num_new_tokens <= out.num_steps
            assert len(s.block_ids) * bs >= start + s.num_new_tokens
            if start < req.num_tokens:
                assert start == req.num_tokens - 1
                token = req.all_token_ids[start]
            else:
                token = self.last[s.request_id]
                self.num_fed_ahead += 1
            tokens = []
            for p in range(start, start + s.num_new_tokens):
                self.kv[s.block_ids[p // bs], p % bs] = token
                token = next_token([self.kv[s.block_ids[q // bs], q % bs] for q in range(p + 1)])
                tokens.append(token)
            self.num_fed += len(tokens) - 1
            sampled[s.request_id] = tokens
        self.last = {rid: tokens[-1] for rid, tokens in sampled.items()}
        return sampled


def run_multi(sched: Scheduler, model: MultiStepModel, on_step=None,
              max_steps=5000) -> list[Request]:
    """`run` asking for multi-step decodes of up to 3 steps."""
    finished = []
    for step in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        out = sched.schedule(num_steps=3)
        check_step(sched, out)
        if on_step is not None:
            on_step(step, out)
        finished += sched.update_from_output(out, model.step(out))
    raise AssertionError("did not finish")


RUNNERS = {"in_order": (run, FakeModel), "ahead": (run_ahead, AheadModel),
           "multi": (run_multi, MultiStepModel),
           "multi_pipelined": (functools.partial(run_ahead, multi_step=True), MultiStepModel)}


def assert_no_leaks(sched: Scheduler) -> None:
    kv = sched.kv_manager
    assert not sched.running and not sched.num_waiting and not sched.requests
    assert kv.num_free_blocks == kv.num_blocks - 1 and kv.usage == 0.0
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks[1:])


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    sched = make_scheduler(max_num_batched_tokens=16)
    req = make_request(range(1, 51), max_tokens=3)
    sched.add_request(req)
    steps = []
    run(sched, FakeModel(4), lambda i, out: steps.append(
        [(s.num_new_tokens, s.do_sample) for s in out.scheduled]))
    assert steps == [[(16, False)], [(16, False)], [(16, False)],
                     [(2, True)], [(1, True)], [(1, True)]]
    assert req.output_token_ids == reference_output(list(range(1, 51)), 3)
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED and req.num_cached_tokens == 0
    assert_no_leaks(sched)


def test_running_first_then_new_prompt_fills_the_remaining_budget():
    sched = make_scheduler(max_num_batched_tokens=16)
    model = FakeModel(4)
    a, b = make_request(range(4), max_tokens=10), make_request(range(100, 140), max_tokens=2)
    sched.add_request(a)
    sched.update_from_output(out := sched.schedule(), model.step(out))
    sched.add_request(b)
    out = sched.schedule()
    rows = [(s.request_id, s.num_new_tokens) for s in out.scheduled]
    assert rows == [(a.request_id, 1), (b.request_id, 15)]
    sched.update_from_output(out, model.step(out))
    run(sched, model)
    assert a.output_token_ids == reference_output(list(range(4)), 10)
    assert b.output_token_ids == reference_output(list(range(100, 140)), 2)
    assert_no_leaks(sched)


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(range(i, i + 5), max_tokens=4) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    counts = []
    run(sched, FakeModel(4), lambda i, out: counts.append(len(out.scheduled)))
    assert max(counts) == 2
    for i, r in enumerate(reqs):
        assert r.output_token_ids == reference_output(list(range(i, i + 5)), 4)
    assert_no_leaks(sched)


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=32, max_model_len=32,
                           enable_chunked_prefill=False)
    model = FakeModel(4)
    a, b = make_request(range(20), max_tokens=3), make_request(range(50, 70), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [(a.request_id, 20)]
    sched.update_from_output(out, model.step(out))
    out = sched.schedule()  # b waited for a whole budget: a decode token + its 20 now fit
    assert [s.num_new_tokens for s in out.scheduled] == [1, 20]
    sched.update_from_output(out, model.step(out))
    run(sched, model)
    assert b.output_token_ids == reference_output(list(range(50, 70)), 3)
    assert_no_leaks(sched)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32,
                        enable_chunked_prefill=False)


@pytest.mark.parametrize("mode", list(RUNNERS))
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_recomputes_and_gives_the_same_tokens(policy, prefix_caching, mode):
    # 16 usable blocks of 4 = 64 tokens; six requests of 10 + 30 tokens want 60 blocks.
    sched = make_scheduler(num_blocks=17, max_model_len=64, policy=policy,
                           enable_prefix_caching=prefix_caching)
    prompts = [list(range(10 * i, 10 * i + 10)) for i in range(6)]
    reqs = [make_request(p, max_tokens=30, priority=i % 3) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    preempted = []
    drive, model_type = RUNNERS[mode]
    model = model_type(4)
    drive(sched, model, lambda i, out: preempted.extend(out.preempted_req_ids))
    assert sched.num_preemptions == len(preempted) > 0
    assert mode == "in_order" or model.num_fed > {"ahead": 100, "multi": 10,
                                                   "multi_pipelined": 10}[mode]
    assert mode != "multi_pipelined" or model.num_fed_ahead > 0
    for p, r in zip(prompts, reqs):
        assert r.output_token_ids == reference_output(p, 30)
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_no_leaks(sched)


def test_fcfs_preempts_the_newest_and_requeues_it_at_the_front():
    sched = make_scheduler(num_blocks=7, max_model_len=24)  # 6 usable blocks
    model = FakeModel(4)
    a, b, c, d = (make_request(range(k, k + 8), max_tokens=12) for k in (0, 20, 40, 60))
    for r in (a, b, c, d):
        sched.add_request(r)
    sched.update_from_output(out := sched.schedule(), model.step(out))
    assert sched.get_request_counts() == (3, 1)  # 2 blocks each, nothing free; d waits
    out = sched.schedule()  # a needs a third block: c (the newest) goes, b gets its block
    assert out.preempted_req_ids == [c.request_id]
    assert [s.request_id for s in out.scheduled] == [a.request_id, b.request_id]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.block_ids == [] and c.num_output_tokens == 1  # keeps its generated token
    assert list(sched.iter_waiting()) == [c, d]
    sched.update_from_output(out, model.step(out))
    run(sched, model)
    for k, r in zip((0, 20, 40, 60), (a, b, c, d)):
        assert r.output_token_ids == reference_output(list(range(k, k + 8)), 12)
    assert_no_leaks(sched)


def test_priority_policy_admission_order():
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    reqs = {name: make_request(range(3), max_tokens=2, rid=name, priority=p)
            for name, p in [("low", 5), ("high", 0), ("mid", 2), ("high2", 0)]}
    for r in reqs.values():
        sched.add_request(r)
    assert [r.request_id for r in sched.iter_waiting()] == ["high", "high2", "mid", "low"]
    finished = run(sched, FakeModel(4))
    assert [r.request_id for r in finished] == ["high", "high2", "mid", "low"]
    assert_no_leaks(sched)


def test_priority_policy_preempts_the_lowest_priority_even_if_already_scheduled():
    sched = make_scheduler(num_blocks=6, max_model_len=20, policy="priority")  # 5 usable blocks
    model = FakeModel(4)
    low = make_request(range(8), max_tokens=5, rid="low", priority=5)
    high = make_request(range(30, 38), max_tokens=5, rid="high", priority=0)
    sched.add_request(low)
    sched.update_from_output(out := sched.schedule(), model.step(out))
    sched.add_request(high)
    out = sched.schedule()  # low takes its 3rd block, high its 2
    assert [s.request_id for s in out.scheduled] == ["low", "high"]
    sched.update_from_output(out, model.step(out))
    assert sched.kv_manager.num_free_blocks == 0
    out = sched.schedule()  # high needs a 3rd block: low goes, though it was scheduled first
    assert out.preempted_req_ids == ["low"]
    assert [s.request_id for s in out.scheduled] == ["high"] and out.num_scheduled_tokens == 1
    sched.update_from_output(out, model.step(out))
    run(sched, model)
    assert low.output_token_ids == reference_output(list(range(8)), 5)
    assert high.output_token_ids == reference_output(list(range(30, 38)), 5)
    assert_no_leaks(sched)


def test_fcfs_does_not_skip_a_request_that_does_not_fit():
    sched = make_scheduler(num_blocks=7, max_model_len=24)  # 6 usable blocks
    a = make_request(range(12), max_tokens=2)  # 3 blocks
    b = make_request(range(100, 116), max_tokens=2)  # 4 blocks: does not fit next to a
    c = make_request(range(200, 204), max_tokens=2)  # 1 block: would fit, must wait behind b
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == [a.request_id]
    assert sched.get_request_counts() == (1, 2)
    model = FakeModel(4)
    sched.update_from_output(out, model.step(out))
    finished = run(sched, model)
    assert [r.request_id for r in finished][-2:] == [b.request_id, c.request_id]
    assert_no_leaks(sched)


def test_abort_frees_blocks_and_is_reported_to_the_runner():
    sched = make_scheduler(max_num_seqs=2)
    model = FakeModel(4)
    a, b, c = (make_request(range(k, k + 9), max_tokens=20) for k in (0, 20, 40))
    for r in (a, b, c):
        sched.add_request(r)
    sched.update_from_output(out := sched.schedule(), model.step(out))
    assert sched.get_request_counts() == (2, 1) and sched.kv_manager.usage > 0
    done = sched.finish_requests([a.request_id, c.request_id, "nope"],
                                 RequestStatus.FINISHED_ABORTED)
    assert done == [a, c] and a.status == c.status == RequestStatus.FINISHED_ABORTED
    assert a.block_ids == [] and sched.get_request_counts() == (1, 0)
    assert sched.get_num_unfinished_requests() == 1
    out = sched.schedule()
    assert out.finished_req_ids == {a.request_id, c.request_id}
    assert [s.request_id for s in out.scheduled] == [b.request_id]
    # Aborted between schedule() and update_from_output(): the step's result is dropped.
    sched.finish_requests(b.request_id, RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, model.step(out)) == []
    assert b.num_output_tokens == 1 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_req_ids == {b.request_id}
    assert_no_leaks(sched)


def scripted(sched: Scheduler, req: Request, tokens: list[int], ahead: bool = False,
             num_steps: int = 1) -> list[int]:
    """Feed `tokens` as the sampled tokens until the request finishes; `ahead`: each step
    scheduled before the previous one is folded in (then the request is in one step more
    than it keeps tokens unless it finishes on its length); `num_steps`: multi-step decodes
    of that many steps asked for (a call's tokens after a stop are dropped)."""
    sched.add_request(req)
    it = iter(tokens)
    in_flight = None
    while sched.has_unfinished_requests() or in_flight is not None:
        out = sched.schedule(num_steps=num_steps)
        if out.num_steps > 1:
            # past the script: tokens the call samples after the stop (dropped)
            sampled = {s.request_id: [next(it, 99) for _ in range(s.num_new_tokens)]
                       for s in out.scheduled}
        else:
            sampled = {s.request_id: next(it) for s in out.scheduled if s.do_sample}
        if not ahead:
            sched.update_from_output(out, sampled)
            continue
        if in_flight is not None:
            sched.update_from_output(*in_flight)
        in_flight = (out, sampled) if out.scheduled else None
    assert_no_leaks(sched)
    return req.output_token_ids


@pytest.mark.parametrize("mode", [{}, {"ahead": True}, {"num_steps": 3},
                                  {"num_steps": 3, "ahead": True}])
def test_stop_conditions(mode):
    eos = 2
    r = make_request(range(5), max_tokens=10, eos=eos)
    assert scripted(make_scheduler(), r, **mode, tokens=[7, 8, eos, 9]) == [7, 8, eos]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None

    r = make_request(range(5), max_tokens=10, eos=eos, min_tokens=3)
    assert scripted(make_scheduler(), r, **mode, tokens=[eos, 8, eos, 9]) == [eos, 8, eos]

    r = make_request(range(5), max_tokens=4, eos=eos, ignore_eos=True)
    assert scripted(make_scheduler(), r, **mode, tokens=[eos] * 6) == [eos] * 4
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED

    r = make_request(range(5), max_tokens=10, eos=eos, stop_token_ids=[11, 12])
    assert scripted(make_scheduler(), r, **mode, tokens=[7, 12, 9]) == [7, 12]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 12

    # Length is checked first, as vLLM V1: eos as the max_tokens-th token reports "length".
    r = make_request(range(5), max_tokens=2, eos=eos)
    assert scripted(make_scheduler(), r, **mode, tokens=[7, eos]) == [7, eos]
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED

    r = make_request(range(60), max_tokens=None)
    assert len(scripted(make_scheduler(max_model_len=64), r, **mode, tokens=[1] * 10)) == 4
    assert r.num_tokens == 64 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_multi_step_only_for_a_decoding_batch_that_nothing_could_join():
    sched = make_scheduler(max_num_seqs=2)
    model = MultiStepModel(4)
    a = make_request(range(5), max_tokens=6)
    b = make_request(range(3), max_tokens=2, repetition_penalty=1.2)
    c = make_request(range(20, 29), max_tokens=3)

    def step(expected_steps, expected_rows):
        out = sched.schedule(num_steps=4)
        assert out.num_steps == expected_steps
        assert [(s.request, s.num_new_tokens) for s in out.scheduled] == expected_rows
        sched.update_from_output(out, model.step(out))

    sched.add_request(a)
    step(1, [(a, 5)])  # a prompt
    step(4, [(a, 4)])  # a decoding alone
    sched.add_request(b)
    step(1, [(a, 1), (b, 3)])  # b could join: single steps; a reaches max_tokens
    step(1, [(b, 1)])  # b's penalties need its tokens on the host between steps
    sched.add_request(c)
    step(1, [(c, 9)])
    step(4, [(c, 2)])  # capped by max_tokens
    for r, n in ((a, 6), (b, 2), (c, 3)):
        assert r.output_token_ids == reference_output(list(r.prompt_token_ids), n)
    assert_no_leaks(sched)


def test_add_request_validation():
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_request(range(4), rid="x"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request(range(4), rid="x"))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request(range(17)))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request([]))
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_scheduler(num_blocks=4, block_size=4, max_model_len=16)


def test_prefix_cache_hits_in_the_scheduler():
    sched = make_scheduler()
    model = FakeModel(4)
    shared = list(range(1, 19))
    a = make_request(shared, max_tokens=3)
    sched.add_request(a)
    run(sched, model)
    b = make_request(shared + [40, 41], max_tokens=3)
    c = make_request(shared[:16], max_tokens=3)  # exactly cached: the last block is recomputed
    sched.add_request(b)
    sched.add_request(c)
    run(sched, model)
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 16 and c.num_cached_tokens == 12
    assert b.output_token_ids == reference_output(shared + [40, 41], 3)
    assert c.output_token_ids == reference_output(shared[:16], 3)
    kv = sched.kv_manager
    assert kv.prefix_cache_queries == 18 + 20 + 16 and kv.prefix_cache_hits == 28
    assert_no_leaks(sched)


def test_a_block_is_cached_only_once_its_kv_is_computed():
    sched = make_scheduler()
    model = FakeModel(4)
    a = make_request(range(1, 8), max_tokens=1)  # its sampled 8th token fills block 1, uncomputed
    sched.add_request(a)
    run(sched, model)
    assert sched.kv_manager.block_pool.num_cached_blocks == 1
    b = make_request(a.all_token_ids + [9, 9], max_tokens=2)
    sched.add_request(b)
    run(sched, model)
    assert b.num_cached_tokens == 4
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2)
    assert_no_leaks(sched)


@pytest.mark.parametrize("mode", list(RUNNERS))
@pytest.mark.parametrize("seed", range(6))
def test_random_workload_matches_running_alone(seed, mode):
    rng = random.Random(seed)
    policy = ["fcfs", "priority"][seed % 2]
    sched = make_scheduler(num_blocks=rng.randint(17, 30), block_size=4, max_model_len=64,
                           max_num_seqs=rng.randint(1, 6),
                           max_num_batched_tokens=rng.choice([8, 16, 64]),
                           policy=policy, enable_prefix_caching=seed % 3 != 0)
    drive, model_type = RUNNERS[mode]
    model = model_type(4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    pending = []
    for _ in range(25):
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
        pending.append(make_request(prompt, max_tokens=rng.randint(1, 64 - len(prompt)),
                                    priority=rng.randrange(3)))
    expected = {r.request_id: reference_output(r.prompt_token_ids, r.max_tokens) for r in pending}
    aborted = set()

    def on_step(step, out):
        if pending and rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                if pending:
                    sched.add_request(pending.pop(0))
        if sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(sched.requests))
            aborted.add(rid)
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)

    sched.add_request(pending.pop(0))
    finished = drive(sched, model, on_step)
    while pending:  # whatever the loop left unsubmitted
        sched.add_request(pending.pop(0))
        finished += drive(sched, model)
    assert len(finished) + len(aborted) == 25
    for r in finished:
        assert r.output_token_ids == expected[r.request_id]
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert not mode.startswith("multi") or model.num_fed > 0
    assert_no_leaks(sched)


def test_multi_step_append_equals_a_stop_check_per_token():
    """`_append_until_stop` (a multi-step row's tokens at once) ends a request where
    appending them one by one with `_check_stop` after each does: same tokens, status,
    stop reason and computed count, whatever the limits, eos, stop ids and min_tokens."""
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        max_model_len = rng.randint(8, 40)
        sched = make_scheduler(max_model_len=max_model_len)
        params = dict(max_tokens=rng.choice([None, rng.randint(1, 30)]),
                      min_tokens=rng.choice([0, 0, rng.randint(1, 6)]),
                      stop_token_ids=rng.sample(range(10), rng.randint(0, 2)),
                      ignore_eos=rng.random() < 0.3)
        eos = rng.choice([None, 3])
        prompt = [7] * rng.randint(1, max_model_len - 1)
        earlier = [rng.randrange(10) for _ in range(rng.randint(0, 5))]
        one, bulk = (make_request(prompt, eos=eos, **params) for _ in range(2))
        for req in (one, bulk):
            for token in earlier:
                req.append_output_token(token)
            req.num_computed_tokens = req.num_tokens - 1
            req.status = RequestStatus.RUNNING
        if sched._finishes_on_length(one):
            continue  # it would have finished already
        tokens = [rng.randrange(10) for _ in range(rng.randint(1, 6))]
        stopped = False
        for token in tokens:
            one.num_computed_tokens += 1
            one.append_output_token(token)
            if stopped := sched._check_stop(one):
                break
        assert sched._append_until_stop(bulk, tokens) == stopped
        assert (bulk.output_token_ids, bulk.status, bulk.stop_reason, bulk.num_computed_tokens) \
            == (one.output_token_ids, one.status, one.stop_reason, one.num_computed_tokens)
        checked += 1
    assert checked > 2000
