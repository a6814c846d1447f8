"""Bucket-aligned chunked-prefill grants: a prompt chunk cut short by the token budget is
trimmed so that the step's token count is a power of two (the runner's token bucket), and no
other grant changes.

Scheduler-level tests run the fake paged model of test_scheduler.py and compare every step with
what the untrimmed rule schedules from the same state; the engine tests check that greedy
outputs on a tiny random Llama are those of each prompt prefilled whole.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest

try:
    from test_scheduler import (FakeModel, assert_no_leaks, check_step, make_request,
                                make_scheduler, reference_output)
except ImportError:  # tests/ imported as a package
    from tests.test_scheduler import (FakeModel, assert_no_leaks, check_step, make_request,
                                      make_scheduler, reference_output)
from jaxvllm import LLM, SamplingParams
from jaxvllm.engine.runner import ModelRunner, bucket
from jaxvllm.engine.scheduler import (MIN_TOKEN_BUCKET, Scheduler, SchedulerOutput,
                                      bucket_aligned_grant, token_bucket_floor)
from jaxvllm.simple_generate import SimpleGenerator


def cut_short(out: SchedulerOutput) -> list:
    """Rows that stop before the end of their sequence: prompt chunks cut by the budget."""
    return [s for s in out.scheduled if not s.do_sample]


# ---------------------------------------------------------------------------------------------
# The bucket rule
# ---------------------------------------------------------------------------------------------


def test_token_bucket_floor():
    assert [token_bucket_floor(n) for n in (0, 1, 15, 16, 17, 31, 32, 300, 512, 1023)] == \
        [0, 0, 0, 16, 16, 16, 32, 256, 512, 512]


@pytest.mark.parametrize("fine", [False, True])
def test_fine_decode_buckets(fine):
    """With fine_decode_buckets (the CPU), steps up to max_reqs_bucket tokens pad to any power
    of two and from 24 up to 3 * 2^k too: at most 1/3 padding there; larger steps and the
    default keep powers of two from 16."""
    runner = SimpleNamespace(max_tokens_bucket=256, max_reqs_bucket=64, fine_decode_buckets=fine)
    got = {n: ModelRunner.token_bucket(runner, n) for n in range(1, 257)}
    want_small = {1: 1 if fine else 16, 3: 4 if fine else 16, 7: 8 if fine else 16, 9: 16,
                  16: 16, 17: 24 if fine else 32, 24: 24 if fine else 32, 25: 32,
                  33: 48 if fine else 64, 48: 48 if fine else 64, 49: 64, 64: 64}
    assert {n: got[n] for n in want_small} == want_small
    assert got[65] == got[96] == got[128] == 128 and got[129] == got[192] == got[256] == 256
    for n, T in got.items():
        assert T >= n and (T - n) * (3 if fine and 16 < n <= 64 else 2) <= max(T, 32)


def test_bucket_floor_is_the_runners_bucket():
    """A total on a bucket is not padded by the runner; one token past it doubles the step."""
    for budget in (16, 20, 64, 300, 1000, 4096):
        max_bucket = bucket(budget, MIN_TOKEN_BUCKET)
        for total in range(MIN_TOKEN_BUCKET, budget + 1):
            floor = token_bucket_floor(total)
            assert floor <= total < 2 * floor
            assert bucket(floor, MIN_TOKEN_BUCKET, max_bucket) == floor
            if total > floor:
                assert bucket(total, MIN_TOKEN_BUCKET, max_bucket) == 2 * floor


@pytest.mark.parametrize("granted, already, expected", [
    (290, 10, 246),  # 10 decodes + a long prompt under a 300-token budget: 256 in all
    (300, 0, 256),
    (256, 0, 256),  # already on a bucket
    (20, 0, 16),
    (40, 10, 22),  # total 50 -> 32
    (3, 17, 3),  # total 20 -> 16 would leave nothing of the grant: unchanged
    (4, 16, 4),  # likewise (exactly nothing left)
    (5, 16, 5),  # total 21: the grant must keep at least one token
    (6, 16, 6),
    (10, 0, 10),  # below the smallest bucket: unchanged
    (5, 8, 5),
])
def test_bucket_aligned_grant(granted, already, expected):
    assert bucket_aligned_grant(granted, already) == expected


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------


def test_long_prompt_beside_ten_decodes_fills_exactly_a_bucket():
    sched = make_scheduler(num_blocks=200, block_size=16, max_num_seqs=16,
                           max_num_batched_tokens=300, max_model_len=2048)
    model = FakeModel(16)
    decoders = [make_request([3 + i] * 5, max_tokens=40) for i in range(10)]
    for req in decoders:
        sched.add_request(req)
    out = sched.schedule()
    assert out.num_scheduled_tokens == 50  # whole prompts: not trimmed
    sched.update_from_output(out, model.step(out))

    prompt = [(7 * i) % 50 for i in range(1000)]
    long = make_request(prompt, max_tokens=5)
    sched.add_request(long)
    steps = []
    while long.num_computed_tokens < len(prompt):
        out = sched.schedule()
        check_step(sched, out)
        steps.append(([s.num_new_tokens for s in out.scheduled if s.request is not long],
                      next(s.num_new_tokens for s in out.scheduled if s.request is long),
                      out.num_scheduled_tokens))
        sched.update_from_output(out, model.step(out))
    # the last 262 tokens fit the budget whole: that grant is not trimmed
    assert steps == [([1] * 10, 246, 256)] * 3 + [([1] * 10, 262, 272)]

    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, model.step(out))
    assert long.output_token_ids == reference_output(prompt, 5)
    for req in decoders:
        assert req.output_token_ids == reference_output(req.prompt_token_ids, 40)
    assert_no_leaks(sched)


def untrimmed_schedule(sched: Scheduler) -> SchedulerOutput:
    """What a copy of `sched` schedules with a cut-short grant left as the rest of the budget."""
    # the FCFS queue never draws from its tie-break counter, which deepcopy should not copy
    shadow = copy.deepcopy(sched, memo={id(sched.waiting._seq): sched.waiting._seq})
    shadow._grant = lambda wanted, budget: (min(wanted, budget), min(wanted, budget))
    return shadow.schedule()


@pytest.mark.parametrize("seed", range(8))
def test_only_cut_short_grants_change_and_steps_land_on_buckets(seed):
    rng = random.Random(seed)
    budget = rng.choice([20, 24, 37, 50, 100, 64])
    sched = make_scheduler(num_blocks=rng.randint(40, 80), block_size=4, max_model_len=128,
                           max_num_seqs=rng.randint(2, 8), max_num_batched_tokens=budget,
                           enable_prefix_caching=seed % 2 == 0)
    model = FakeModel(4)
    pending = []
    for _ in range(20):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 90))]
        pending.append(make_request(prompt, max_tokens=rng.randint(1, 128 - len(prompt))))
    expected = {r.request_id: reference_output(r.prompt_token_ids, r.max_tokens) for r in pending}
    finished, compared, trimmed = [], 0, 0
    for _ in range(5000):
        if pending and rng.random() < 0.4:
            sched.add_request(pending.pop(0))
        if not sched.has_unfinished_requests():
            if not pending:
                break
            continue
        old = untrimmed_schedule(sched)
        out = sched.schedule()
        check_step(sched, out)
        cut = cut_short(out)
        assert len(cut) <= 1
        if cut:  # the step ends on a bucket, unless that would leave the chunk no token
            total, n = out.num_scheduled_tokens, cut[0].num_new_tokens
            floor = token_bucket_floor(total)
            assert total == floor or n <= total - floor
        if not old.preempted_req_ids and not out.preempted_req_ids:
            compared += 1
            rows = [s.request_id for s in out.scheduled]
            old_rows = [s.request_id for s in old.scheduled]
            if rows != old_rows:
                # a prompt whose untrimmed chunk found no free blocks gets its trimmed one in
                assert rows[:-1] == old_rows and not out.scheduled[-1].do_sample
                assert old.num_scheduled_tokens < budget
            for new_row, old_row in zip(out.scheduled, old.scheduled):
                assert new_row.num_computed_tokens == old_row.num_computed_tokens
                if old_row.do_sample:  # a whole remainder or a decode: untouched
                    assert new_row.num_new_tokens == old_row.num_new_tokens
                else:
                    already = old.num_scheduled_tokens - old_row.num_new_tokens
                    assert new_row.num_new_tokens == bucket_aligned_grant(
                        old_row.num_new_tokens, already)
                    trimmed += new_row.num_new_tokens < old_row.num_new_tokens
        finished += sched.update_from_output(out, model.step(out))
    assert not pending and not sched.has_unfinished_requests()
    assert compared > 0
    if budget & (budget - 1) == 0:
        assert trimmed == 0  # a power-of-two budget: a cut-short step is already a bucket
    else:
        assert trimmed > 0
    assert len(finished) == 20
    for r in finished:
        assert r.output_token_ids == expected[r.request_id]
    assert_no_leaks(sched)


def test_a_lone_long_prompt_is_cut_to_a_bucket():
    sched = make_scheduler(max_num_batched_tokens=37, max_model_len=128, num_blocks=64)
    sched.add_request(make_request([1] * 100, max_tokens=2))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [32]
    assert not out.scheduled[0].do_sample


def test_no_trim_without_chunked_prefill_and_for_whole_prompts():
    sched = make_scheduler(max_num_batched_tokens=50, max_model_len=50, num_blocks=64,
                           enable_chunked_prefill=False)
    a, b = make_request([1] * 30, max_tokens=2), make_request([2] * 30, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [(a.request_id, 30)]


# ---------------------------------------------------------------------------------------------
# The engine: greedy outputs are those of whole-prompt prefills
# ---------------------------------------------------------------------------------------------

CASE = "llama_gqa"
MAX_MODEL_LEN = 256
LENGTHS = [200, 150, 120, 90, 60, 30]
MAX_TOKENS = [8, 12, 16, 10, 6, 14]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rs = np.random.RandomState(11)
    return [[int(t) for t in rs.randint(3, 256, n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def unchunked(zoo, prompts) -> list[list[int]]:
    """Greedy tokens of every prompt, prefilled whole, no scheduler."""
    gen = SimpleGenerator(zoo.loaded(CASE).model)
    tokens = gen.generate(prompts, max(MAX_TOKENS))
    return [t[:mt] for t, mt in zip(tokens, MAX_TOKENS)]


@pytest.mark.parametrize("budget", [300, 256])
def test_greedy_outputs_equal_unchunked(zoo, prompts, unchunked, budget):
    llm = LLM(str(zoo.case(CASE).path), max_num_batched_tokens=budget,
              max_model_len=MAX_MODEL_LEN, max_num_seqs=8, block_size=16, seed=0)
    engine = llm.llm_engine
    schedules = []
    original = engine.scheduler.schedule

    def schedule(**kwargs):
        schedules.append(original(**kwargs))
        return schedules[-1]

    engine.scheduler.schedule = schedule
    params = [SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True) for mt in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == unchunked

    chunked = [out for out in schedules if cut_short(out)]
    assert chunked, "no prompt was chunked"
    for out in chunked:
        total = out.num_scheduled_tokens
        assert bucket(total, MIN_TOKEN_BUCKET, engine.runner.max_tokens_bucket) == total
    if budget == 300:
        assert any(out.num_scheduled_tokens < budget for out in chunked), "nothing was trimmed"
    else:
        assert all(out.num_scheduled_tokens == budget for out in chunked)
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1
