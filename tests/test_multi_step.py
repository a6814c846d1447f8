"""Multi-step decoding with the real runner: when every running request decodes, one device
call runs up to `num_scheduler_steps` decode steps, each sampling the next one's input.

Outputs must be those of single steps (greedy: each prompt run alone; seeded sampling, stop
strings, stop token ids, eos and max_tokens: the engine with one step per call), whatever
the batch, and every block must be free again afterwards.
"""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.engine.async_engine import AsyncLLMEngine
from jaxvllm.engine.request import Request
from jaxvllm.engine.runner import multi_step_arrays
from jaxvllm.engine.scheduler import ScheduledRequest
from jaxvllm.simple_generate import SimpleGenerator
from tests import test_async_scheduling
from tests.test_async_scheduling import (CASE, abort_one_of_two, assert_each_alone, assert_idle,
                                         generate, greedy, random_prompt)

STEPS = 4
ON_GPU = jax.default_backend() == "gpu"
# On a GPU (scripts/gpu_check.sh runs this file there) the loop runs the Pallas kernels;
# the engines of this module share the device (a cache each, not sized from free memory)
# and compile on the step's path unless a test asks for the background precompile.
GPU_CONFIG = dict(attention_backend="pallas", num_gpu_blocks_override=256, precompile=False)


def make_llm(folder, **kwargs) -> LLM:
    if ON_GPU:
        kwargs = {**GPU_CONFIG, **kwargs}
    return test_async_scheduling.make_llm(folder, **kwargs)


@pytest.fixture(scope="module")
def folder(zoo) -> str:
    return str(zoo.case(CASE).path)


@pytest.fixture(scope="module")
def multi(folder) -> LLM:
    return make_llm(folder, num_scheduler_steps=STEPS)


@pytest.fixture(scope="module")
def single(folder) -> LLM:
    return make_llm(folder, num_scheduler_steps=1)


def multi_steps(llm: LLM) -> int:
    """Device calls so far that ran several decode steps."""
    counters = llm.llm_engine.runner.counters
    return counters.multi_steps


def steps_ahead(llm: LLM) -> int:
    """Steps so far dispatched before the one in flight was collected."""
    return llm.llm_engine.stats()["steps_scheduled_ahead"]


def test_greedy_outputs_match_each_prompt_alone(zoo, multi):
    rs = np.random.RandomState(0)
    lengths, max_tokens = [5, 40, 17, 3, 60, 33], [16, 5, 21, 9, 12, 17]
    prompts = [random_prompt(rs, n) for n in lengths]
    before = multi_steps(multi)
    got = generate(multi, prompts, [greedy(m) for m in max_tokens])
    assert multi_steps(multi) - before >= 3
    assert_each_alone(zoo, prompts, max_tokens, got)
    assert_idle(multi)


def test_seeded_sampling_and_stops_match_single_steps(multi, single):
    """Seeded random sampling draws the same tokens; a stop string (found in the middle of
    a call's tokens: the later ones are dropped), a stop token id, eos and max_tokens end
    each request where single steps end it."""
    rs = np.random.RandomState(1)
    prompts = [random_prompt(rs, n) for n in (9, 30, 14, 22, 6)]
    prompts.append(prompts[0])  # the stop string again, kept in the output
    free = generate(single, prompts[:1], SamplingParams(temperature=1.0, seed=5,
                                                          max_tokens=20, ignore_eos=True))
    text, tokens = free[0][0][1], free[0][0][0]
    eos_engine = multi.llm_engine
    params = [SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             stop=[text[5:7]]),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, max_tokens=15),
              SamplingParams(temperature=1.0, seed=7, max_tokens=12,
                             stop_token_ids=[tokens[6]]),
              greedy(10, stop_token_ids=[7, 8, 9]),
              SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=11),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             stop=[text[5:7]], include_stop_str_in_output=True)]
    assert eos_engine.tokenizer.eos_token_id is None
    want = generate(single, prompts, params)
    before, ahead = multi_steps(multi), steps_ahead(multi)
    got = generate(multi, prompts, params)
    assert multi_steps(multi) - before >= 3
    assert steps_ahead(multi) - ahead >= 2  # calls pipelined: the stops found one call late
    assert got == want
    assert want[0][0][2:] == ("stop", text[5:7])  # the stop string did cut it
    end = text.index(text[5:7]) + 2  # one letter per token: the stop string's last token
    assert (end - 1) % STEPS  # not the last token of a call (the first came with the prompt)
    assert want[0][0][0] == tokens[:end] and want[5][0][1] == text[:end]
    assert_idle(multi)


def random_params(rs: np.random.RandomState, stops: list[str]) -> SamplingParams:
    """Greedy or seeded sampling, with random limits, stop token ids, stop strings and n."""
    kw = dict(max_tokens=int(rs.randint(1, 40)), ignore_eos=bool(rs.randint(2)))
    if rs.randint(3) == 0:
        kw["stop_token_ids"] = [int(t) for t in rs.randint(3, 256, 3)]
    if rs.randint(4) == 0:
        kw["stop"] = [stops[rs.randint(len(stops))]]
    if rs.randint(3) == 0:
        return SamplingParams(temperature=0, **kw)
    if rs.randint(4) == 0:
        kw["n"] = int(rs.randint(2, 4))
    return SamplingParams(temperature=float(rs.uniform(0.5, 1.2)), seed=int(rs.randint(1000)),
                          top_k=int(rs.choice([0, 20])), **kw)


@pytest.mark.parametrize("config", [{}, dict(max_num_seqs=3, num_gpu_blocks_override=30)],
                         ids=["default", "small-cache"])
def test_random_batches_match_single_steps(folder, multi, single, config):
    """Random prompts (some repeated: prefix-cache hits) and params; with few rows and
    blocks, waiting requests and preemptions too: pipelined multi-step calls give what
    single steps give."""
    if config:
        multi = make_llm(folder, num_scheduler_steps=STEPS, **config)
        single = make_llm(folder, num_scheduler_steps=1, **config)
    rs = np.random.RandomState(11 + len(config))
    letters = "abcdefghijklmnopqrstuvwxyz"
    stops = [letters[rs.randint(26)] + letters[rs.randint(26)] for _ in range(20)]
    prompts = [random_prompt(rs, int(rs.randint(2, 50))) for _ in range(10)]
    prompts += prompts[:3]
    params = [random_params(rs, stops) for _ in prompts]
    before, ahead = multi_steps(multi), steps_ahead(multi)
    assert generate(multi, prompts, params) == generate(single, prompts, params)
    assert multi_steps(multi) - before >= 5 and steps_ahead(multi) - ahead >= 2
    if config:
        assert multi.llm_engine.scheduler.num_preemptions > 0
    assert_idle(multi)


def test_eos_mid_call_ends_the_request(zoo, multi):
    """An eos sampled by a step in the middle of a call ends the request there: the call's
    later tokens for it are dropped and its blocks freed."""
    rs = np.random.RandomState(2)
    prompt = random_prompt(rs, 12)
    alone = SimpleGenerator(zoo.loaded(CASE).model).generate([prompt], 24)[0]
    eos = alone[9]  # greedy: the 10th output, mid-call for 4-step calls after the prompt
    first = alone.index(eos)
    engine = multi.llm_engine
    engine._eos_ids = [eos]
    try:
        before, ahead = multi_steps(multi), steps_ahead(multi)
        got = generate(multi, [prompt], SamplingParams(temperature=0, max_tokens=24))
    finally:
        engine._eos_ids = []
    assert multi_steps(multi) > before
    assert steps_ahead(multi) > ahead  # the call after the eos was in flight already
    ((tokens, _, reason, stop_reason),) = got[0]
    assert tokens == alone[:first + 1] and (reason, stop_reason) == ("stop", None)
    assert_idle(multi)


def test_waiting_prompts_and_history_params_take_single_steps(folder):
    """A waiting request that could join the batch, or params needing the host's token
    history (penalties, logprobs), keep single steps (tests/test_scheduler.py): outputs
    are those of single steps in the same batches."""
    llm = make_llm(folder, num_scheduler_steps=STEPS, max_num_seqs=2)
    single = make_llm(folder, num_scheduler_steps=1, max_num_seqs=2)
    rs = np.random.RandomState(3)
    prompts = [random_prompt(rs, n) for n in (8, 12, 16, 5)]
    params = [greedy(12), greedy(9, repetition_penalty=1.5), greedy(7, logprobs=2),
              greedy(14)]
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = single.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        if b.outputs[0].logprobs is not None:  # other programs: float rounding may differ
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert x.keys() == y.keys()
                assert [v.rank for v in x.values()] == [v.rank for v in y.values()]
                np.testing.assert_allclose([v.logprob for v in x.values()],
                                           [v.logprob for v in y.values()], rtol=1e-5)
    assert_idle(llm)

    # rows full (max_num_seqs 2) with a request waiting: the running pair may go multi-step
    before = multi_steps(llm)
    got = generate(llm, prompts, greedy(20))
    assert multi_steps(llm) > before
    assert got == generate(single, prompts, greedy(20))
    assert_idle(llm)


def test_preemption_free_blocks_and_abort(folder, zoo):
    """A small KV cache: calls whose steps ahead do not fit take single steps (preempting
    as usual), and an abort between calls frees everything."""
    llm = make_llm(folder, num_scheduler_steps=STEPS, num_gpu_blocks_override=40)
    rs = np.random.RandomState(4)
    prompts = [random_prompt(rs, n) for n in (30, 25, 20, 28)]
    got = generate(llm, prompts, greedy(40))
    assert_each_alone(zoo, prompts, [40] * len(prompts), got)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_idle(llm)
    before = multi_steps(llm)
    abort_one_of_two(llm, rs, steps_before_abort=4)
    assert multi_steps(llm) > before


def test_multi_step_arrays_slots_and_padding():
    """Each row's slot per step (the null block past its own steps), padded rows empty."""
    bs = 4
    a = Request("a", [1, 2, 3, 4, 5], None)
    a.block_ids = [7, 9]
    a.num_computed_tokens = 4
    b = Request("b", [6, 7], None)
    b.block_ids = [3]
    b.num_computed_tokens = 1
    rows = [ScheduledRequest(a, 3, 4, a.block_ids, True), ScheduledRequest(b, 2, 1,
                                                                          b.block_ids, True)]
    ids, feed, pos, steps, meta, slots = multi_step_arrays(rows, 4, 3, 2, bs)
    assert ids.tolist() == [5, 7, 0, 0] and pos.tolist() == [4, 1, 0, 0]
    assert feed.tolist() == [-1, -1, -1, -1]
    assert steps.tolist() == [3, 2, 0, 0]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 2, 2]
    assert meta.seq_lens.tolist() == [5, 2, 0, 0]
    assert meta.block_tables.tolist() == [[7, 9], [3, 0], [0, 0], [0, 0]]
    # a: positions 4, 5, 6 in block 9; b: positions 1, 2, then the null block
    assert slots.tolist() == [[36, 13, 0, 0], [37, 14, 0, 0], [38, 0, 0, 0]]


def test_multi_step_arrays_feed_rows_in_flight():
    """A row scheduled past its known tokens (after a call in flight) reads its first input
    from that call's output row; one that no call in flight samples for is an error."""
    a = Request("a", [1, 2, 3], None)
    a.block_ids = [5, 6]
    b = Request("b", [4, 5], None)
    b.block_ids = [8]
    rows = [ScheduledRequest(a, 2, 5, a.block_ids, True),  # 3 tokens known, 2 in flight
            ScheduledRequest(b, 1, 1, b.block_ids, True)]
    ids, feed, pos, *_ = multi_step_arrays(rows, 2, 2, 2, 4, prev_rows={a: 3, b: 0})
    assert feed.tolist() == [3, -1] and ids.tolist() == [0, 5] and pos.tolist() == [5, 1]
    with pytest.raises(RuntimeError, match="no step in flight"):
        multi_step_arrays(rows, 2, 2, 2, 4, prev_rows={b: 0})


def test_num_scheduler_steps_is_checked(folder):
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLM(folder, num_scheduler_steps=0)
    with pytest.raises(ValueError, match="without a host plan"):  # block pairs plan on the host
        LLM(folder, num_scheduler_steps=2, attention_backend="xla", max_model_len=64)
    llm = LLM(folder, attention_backend="xla", max_model_len=64)
    assert llm.llm_engine.runner.num_scheduler_steps == 1  # the default where it cannot run
    with pytest.raises(ValueError, match="wait_for_precompile=True needs the precompile"):
        LLM(folder, max_model_len=64, precompile=False, wait_for_precompile=True)


def test_precompiled_multi_step_programs(folder, single):
    """With the background precompile (a GPU's default) the decode batches' programs are the
    multi-step ones; `wait_for_precompile` (a GPU's default) has them compiled when the
    engine is built; a batch runs multi-step calls, padded to a larger program if its own is
    not compiled: outputs are unchanged."""
    llm = make_llm(folder, num_scheduler_steps=STEPS, precompile=True, wait_for_precompile=True)
    runner = llm.llm_engine.runner
    keys = list(runner._compiling)
    assert {k.num_steps for k in keys} == {1, STEPS}
    assert [k.num_tokens for k in keys if k.num_steps == 1] == [runner.max_tokens_bucket]
    assert all(future.done() for future in runner._compiling.values())
    rs = np.random.RandomState(5)
    prompts = [random_prompt(rs, n) for n in (7, 19, 4)]
    params = [greedy(13), SamplingParams(temperature=1.0, seed=2, max_tokens=17),
              greedy(6)]
    got = generate(llm, prompts, params)
    assert runner.counters.multi_steps >= 3
    assert got == generate(single, prompts, params)
    assert_idle(llm)


def test_not_pipelined_with_async_scheduling_off(folder, single):
    """`async_scheduling=False`: each multi-step call is collected before the next is
    scheduled; outputs are the same."""
    llm = make_llm(folder, num_scheduler_steps=STEPS, async_scheduling=False)
    rs = np.random.RandomState(7)
    prompts = [random_prompt(rs, n) for n in (5, 13, 8)]
    params = [greedy(14), SamplingParams(temperature=1.0, seed=8, max_tokens=18), greedy(11)]
    got = generate(llm, prompts, params)
    assert multi_steps(llm) >= 3 and steps_ahead(llm) == 0
    assert got == generate(single, prompts, params)
    assert_idle(llm)


def test_with_async_scheduling(folder, single):
    """With asynchronous scheduling too: steps are scheduled ahead while a long prompt is
    prefilled in chunks beside decoding rows, never ahead of a batch that may take a
    multi-step decode once the step in flight is collected (it would keep its rows in
    flight for good); outputs are those of single steps."""
    llm = make_llm(folder, num_scheduler_steps=STEPS, async_scheduling=True)
    rs = np.random.RandomState(6)
    prompts = [random_prompt(rs, n) for n in (9, 70, 6, 11)]
    params = [greedy(15), SamplingParams(temperature=1.0, seed=4, max_tokens=13), greedy(9),
              greedy(17)]
    got = generate(llm, prompts, params)
    stats = llm.llm_engine.stats()
    assert stats["multi_steps"] >= 3 and stats["steps_scheduled_ahead"] >= 1
    assert got == generate(single, prompts, params)
    assert_idle(llm)


def test_streams_of_the_server_engine(folder, single):
    """The server's engine thread: concurrent streams over pipelined multi-step calls grow
    to the single-step outputs; a stream closed mid-way aborts its request, the others go
    on, and every block is free at the end."""
    llm = make_llm(folder, num_scheduler_steps=STEPS)
    rs = np.random.RandomState(8)
    prompts = [random_prompt(rs, n) for n in (6, 11, 9)]
    params = [greedy(30), SamplingParams(temperature=1.0, seed=3, max_tokens=25,
                                         ignore_eos=True), greedy(40, stop_token_ids=[5])]
    want = generate(single, prompts, params)
    engine = AsyncLLMEngine(llm.llm_engine, log_stats=False)

    async def stream(i):
        outputs = [o async for o in engine.generate({"prompt_token_ids": prompts[i]},
                                                     params[i], f"s{i}")]
        return [len(o.outputs[0].token_ids) for o in outputs], outputs[-1].outputs[0]

    async def closed_early():
        async for o in engine.generate({"prompt_token_ids": prompts[0]}, greedy(60), "gone"):
            if len(o.outputs[0].token_ids) >= 2 * STEPS:
                return len(o.outputs[0].token_ids)  # closes the stream: an abort

    async def run():
        return await asyncio.gather(*(stream(i) for i in range(3)), closed_early())

    try:
        *streams, seen = asyncio.run(run())
    finally:
        engine.shutdown()
    for (lengths, final), (expected,) in zip(streams, want):
        assert lengths == sorted(set(lengths))
        assert (final.token_ids, final.text, final.finish_reason, final.stop_reason) == expected
    assert seen < 60
    stats = llm.llm_engine.stats()
    assert stats["multi_steps"] >= 3 and stats["steps_scheduled_ahead"] >= 1
    assert_idle(llm)


def test_multi_step_rows_with_a_gpus_token_buckets(multi):
    """A GPU pads steps to at least 16 tokens: a multi-step decode pads its rows only up to
    the engine's rows (here 4), which its programs and the fed-token buffer hold."""
    runner = multi.llm_engine.runner
    fine = runner.fine_decode_buckets
    runner.fine_decode_buckets = False
    try:
        assert runner.token_bucket(3) == 16 and runner.max_reqs_bucket == 4
        assert [runner.multi_step_token_bucket(n) for n in (1, 3, 4)] == [4, 4, 4]
        assert runner.multi_step_token_bucket(5) is None
    finally:
        runner.fine_decode_buckets = fine
