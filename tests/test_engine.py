"""LLMEngine end to end on a tiny random Llama (CPU): continuous batching, preemption and
chunked prefill change no token; blocks are all returned; prefix caching, priority scheduling
and request validation.

The oracle is `SimpleGenerator`, greedy, one prompt at a time: no scheduler, no shared cache.
Engines are module-scoped (each compiles a few step programs).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.simple_generate import SimpleGenerator

CASE = "llama_gqa"
VOCAB = 256
BLOCK = 4
MAX_MODEL_LEN = 90
NUM_BLOCKS = 24  # 23 usable blocks = 92 tokens: three long requests cannot all fit
SMALL = dict(max_num_seqs=3, max_num_batched_tokens=32, num_gpu_blocks_override=NUM_BLOCKS,
             block_size=BLOCK, max_model_len=MAX_MODEL_LEN, seed=0)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_prompt(rs: np.random.RandomState, n: int) -> list[int]:
    return [int(t) for t in rs.randint(3, VOCAB, n)]


@pytest.fixture(scope="module")
def folder(zoo) -> str:
    return str(zoo.case(CASE).path)


@pytest.fixture(scope="module")
def oracle(zoo):
    """reference(prompt, max_tokens): greedy tokens of the prompt run alone.

    Every prompt is generated up to the same total length and cut (greedy tokens do not
    depend on how many follow), so the oracle compiles one decode program, not one per length.
    """
    gen = SimpleGenerator(zoo.loaded(CASE).model)
    total = MAX_MODEL_LEN + 6
    memo: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        assert len(prompt) + max_tokens <= total
        key = tuple(prompt)
        if key not in memo:
            memo[key] = gen.generate([list(prompt)], total - len(prompt))[0]
        return memo[key][:max_tokens]

    return reference


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    """Small everything: 3 rows, a 32-token budget, 23 usable KV blocks, prefix caching on."""
    return LLM(folder, enable_prefix_caching=True, **SMALL)


@pytest.fixture(scope="module")
def llm_no_prefix_cache(folder) -> LLM:
    return LLM(folder, enable_prefix_caching=False, **SMALL)


def assert_no_leaked_blocks(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    # every block but the null block is free (cached blocks stay, but evictable)
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1
    assert engine.kv_manager.usage == 0


class ScheduleRecorder:
    """Wraps scheduler.schedule() to keep every SchedulerOutput while in a `with` block."""

    def __init__(self, llm: LLM):
        self.scheduler = llm.llm_engine.scheduler
        self.outputs = []

    def __enter__(self):
        original = self.scheduler.schedule

        def schedule(**kwargs):
            out = original(**kwargs)
            self.outputs.append(out)
            return out

        self.scheduler.schedule = schedule
        return self

    def __exit__(self, *exc):
        del self.scheduler.schedule  # the instance attribute hid the method

    @property
    def num_prompt_chunks(self) -> int:
        """Rows that computed part of a sequence without reaching its end (chunked prefill)."""
        return sum(not s.do_sample for out in self.outputs for s in out.scheduled)

    @property
    def max_rows(self) -> int:
        return max(len(out.scheduled) for out in self.outputs)


# ---------------------------------------------------------------------------------------------
# Continuous batching, preemption and chunked prefill change nothing
# ---------------------------------------------------------------------------------------------

LENGTHS = [5, 40, 17, 3, 60, 33, 8, 25, 1, 50]
MAX_TOKENS = [16, 5, 20, 9, 12, 16, 3, 18, 7, 24]


def test_continuous_batching_matches_each_prompt_alone(llm, oracle):
    rs = np.random.RandomState(0)
    prompts = [random_prompt(rs, n) for n in LENGTHS]
    params = [greedy(mt) for mt in MAX_TOKENS]
    preemptions = llm.llm_engine.scheduler.num_preemptions
    with ScheduleRecorder(llm) as rec:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    assert llm.llm_engine.scheduler.num_preemptions > preemptions, "no preemption happened"
    assert rec.num_prompt_chunks > 0, "no prompt was chunked"
    assert rec.max_rows == 3
    assert all(out.num_scheduled_tokens <= 32 for out in rec.outputs)

    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, mt, out in zip(prompts, MAX_TOKENS, outs):
        (completion,) = out.outputs
        assert out.finished
        assert completion.finish_reason == "length"
        assert completion.token_ids == oracle(prompt, mt), f"prompt of {len(prompt)} tokens"
    assert_no_leaked_blocks(llm)


def test_same_prompts_again_with_warm_prefix_cache(llm, oracle):
    """The cache now holds blocks of the previous test: hits must not change the tokens."""
    rs = np.random.RandomState(0)
    prompts = [random_prompt(rs, n) for n in LENGTHS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[::-1]],
                        [greedy(mt) for mt in MAX_TOKENS[::-1]], use_tqdm=False)
    for prompt, mt, out in zip(prompts[::-1], MAX_TOKENS[::-1], outs):
        assert out.outputs[0].token_ids == oracle(prompt, mt)
    assert llm.llm_engine.kv_manager.prefix_cache_hits > 0
    assert_no_leaked_blocks(llm)


# ---------------------------------------------------------------------------------------------
# Aborts: no leaked blocks, the others unaffected
# ---------------------------------------------------------------------------------------------


def test_abort_mid_way_frees_everything(llm, oracle):
    engine = llm.llm_engine
    rs = np.random.RandomState(1)
    prompts = {f"r{i}": random_prompt(rs, n) for i, n in enumerate([30, 12, 45, 7, 20, 26])}
    max_tokens = {rid: 10 + 2 * i for i, rid in enumerate(prompts)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(max_tokens[rid]))
    # a sampled n=2 request: its two child sequences are aborted together
    engine.add_request("sampled", random_prompt(rs, 9),
                       SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=30, ignore_eos=True))

    finished, seen = {}, set()
    for _ in range(4):
        for out in engine.step():
            seen.add(out.request_id)
            if out.finished:
                finished[out.request_id] = out
    running = {r.request_id for r in engine.scheduler.running}
    waiting = {r.request_id for r in engine.scheduler.iter_waiting()}
    assert running and waiting
    # abort one running request, one still waiting and the n=2 request, wherever it is
    to_abort = [sorted(running & set(prompts))[0], sorted(waiting & set(prompts))[-1], "sampled"]
    engine.abort_request(to_abort)
    engine.abort_request("no-such-request")  # unknown ids are ignored
    engine.abort_request(to_abort[0])  # so are ids aborted already

    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in to_abort, "an aborted request made progress"
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == set(prompts) - set(to_abort)
    for rid, out in finished.items():
        assert out.outputs[0].token_ids == oracle(prompts[rid], max_tokens[rid])
    assert_no_leaked_blocks(llm)

    # the engine still serves, and the aborted ids can be used again
    out = llm.generate({"prompt_token_ids": prompts[to_abort[0]]}, greedy(4), use_tqdm=False)
    assert out[0].outputs[0].token_ids == oracle(prompts[to_abort[0]], 4)
    engine.add_request(to_abort[0], [5, 6, 7], greedy(2))
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaked_blocks(llm)


def test_abort_all_after_one_step(llm):
    engine = llm.llm_engine
    for i in range(5):
        engine.add_request(f"a{i}", [3 + i] * (10 + i), greedy(5))
    engine.step()
    engine.abort_request([f"a{i}" for i in range(5)])
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
    assert_no_leaked_blocks(llm)


# ---------------------------------------------------------------------------------------------
# Prefix caching
# ---------------------------------------------------------------------------------------------


def test_cpu_steps_queue_no_copy_to_the_host(folder, oracle, monkeypatch):
    """A CPU step's outputs are host memory already. A copy queued at dispatch completes on
    XLA's thread after the step and takes the interpreter there: when the last step's came
    while the program exited, the process aborted. Single steps (with logprobs) and
    multi-step decodes queue none."""
    from jax._src import array

    queued = []
    original = array.ArrayImpl.copy_to_host_async

    def record(self):
        queued.append(self.shape)
        return original(self)

    rs = np.random.RandomState(3)
    prompts = [random_prompt(rs, n) for n in (5, 9)]
    for steps in (1, 4):
        llm = LLM(folder, num_scheduler_steps=steps, **SMALL)  # loading reads weights back
        # logprobs take single steps: asked for only where multi-step decodes are not
        params = [greedy(6), greedy(6, logprobs=2 if steps == 1 else None)]
        with monkeypatch.context() as patch:
            patch.setattr(array.ArrayImpl, "copy_to_host_async", record)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [oracle(p, 6) for p in prompts]
        if steps == 1:
            assert len(outs[1].outputs[0].logprobs) == 6
        else:
            assert llm.llm_engine.runner.counters.multi_steps > 0
    assert queued == []


@pytest.mark.parametrize("prefix_len", [24, 27])
def test_prefix_cache_hit_on_shared_prefix(llm, llm_no_prefix_cache, oracle, prefix_len):
    rs = np.random.RandomState(100 + prefix_len)  # a prefix no earlier test has cached
    prefix = random_prompt(rs, prefix_len)
    first = prefix + random_prompt(rs, 6)
    second = prefix + random_prompt(rs, 9)
    assert first[prefix_len] != second[prefix_len]

    engine = llm.llm_engine
    hits_before = engine.kv_manager.prefix_cache_hits
    (out1,) = llm.generate({"prompt_token_ids": first}, greedy(6), use_tqdm=False)
    (out2,) = llm.generate({"prompt_token_ids": second}, greedy(10), use_tqdm=False)
    assert out1.num_cached_tokens == 0
    expected_hit = prefix_len // BLOCK * BLOCK  # full blocks of the shared prefix only
    assert out2.num_cached_tokens == expected_hit > 0
    assert out2.num_cached_tokens % BLOCK == 0
    assert engine.kv_manager.prefix_cache_hits - hits_before == expected_hit

    (plain,) = llm_no_prefix_cache.generate({"prompt_token_ids": second}, greedy(10),
                                            use_tqdm=False)
    assert plain.num_cached_tokens == 0
    assert out2.outputs[0].token_ids == plain.outputs[0].token_ids == oracle(second, 10)
    assert_no_leaked_blocks(llm)
    assert_no_leaked_blocks(llm_no_prefix_cache)


def test_whole_prompt_cached_still_computes_a_token(llm, oracle):
    """The same block-aligned prompt twice: at most all but the last block is reused (the
    last token must be computed for its logits), and the output is the same."""
    rs = np.random.RandomState(7)
    prompt = random_prompt(rs, 5 * BLOCK)
    (a,) = llm.generate({"prompt_token_ids": prompt}, greedy(5), use_tqdm=False)
    (b,) = llm.generate({"prompt_token_ids": prompt}, greedy(5), use_tqdm=False)
    assert 0 < b.num_cached_tokens < len(prompt)
    assert b.num_cached_tokens % BLOCK == 0
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == oracle(prompt, 5)
    assert_no_leaked_blocks(llm)


# ---------------------------------------------------------------------------------------------
# Priority scheduling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_priority(folder) -> LLM:
    return LLM(folder, scheduling_policy="priority", **{**SMALL, "max_num_seqs": 1})


def run_and_record_finish_order(engine, finished: dict | None = None) -> list[str]:
    order = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                if finished is not None:
                    finished[out.request_id] = out
    return order


def test_priority_order_with_one_row(llm_priority, oracle):
    engine = llm_priority.llm_engine
    rs = np.random.RandomState(3)
    priorities = {"a": 3, "b": 0, "c": 2, "d": -1, "e": 2, "f": 1}
    prompts = {rid: random_prompt(rs, 4 + 3 * i) for i, rid in enumerate(priorities)}
    for i, (rid, prio) in enumerate(priorities.items()):
        engine.add_request(rid, prompts[rid], greedy(3), arrival_time=100.0 + i, priority=prio)
    finished = {}
    order = run_and_record_finish_order(engine, finished)
    # lower value first; "c" and "e" tie on priority and go by arrival
    assert order == ["d", "b", "f", "c", "e", "a"]
    for rid, out in finished.items():
        assert out.outputs[0].token_ids == oracle(prompts[rid], 3)
    assert_no_leaked_blocks(llm_priority)


def test_priority_does_not_preempt_a_running_request(llm_priority):
    """A more urgent arrival waits for the free row (vLLM preempts only for KV blocks)."""
    engine = llm_priority.llm_engine
    engine.add_request("slow", [5] * 10, greedy(8), priority=5)
    engine.step()
    engine.add_request("urgent", [6] * 10, greedy(2), priority=0)
    engine.add_request("later", [7] * 10, greedy(2), priority=9)
    assert run_and_record_finish_order(engine) == ["slow", "urgent", "later"]
    assert_no_leaked_blocks(llm_priority)


def test_generate_with_priorities_keeps_prompt_order(llm_priority, oracle):
    prompts = [[10 + i] * (3 + i) for i in range(4)]
    outs = llm_priority.generate([{"prompt_token_ids": p} for p in prompts], greedy(4),
                                 use_tqdm=False, priority=[3, 2, 1, 0])
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == oracle(p, 4)
    with pytest.raises(ValueError, match="priorities"):
        llm_priority.generate([[1, 2], [3, 4]], greedy(2), use_tqdm=False, priority=[0])


# ---------------------------------------------------------------------------------------------
# Validation before scheduling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [
    pytest.param({"prompt_token_ids": list(range(3, 3 + MAX_MODEL_LEN + 1))}, id="too-long"),
    pytest.param({"prompt_token_ids": [7] * (MAX_MODEL_LEN + 40)}, id="much-too-long"),
    pytest.param({"prompt_token_ids": []}, id="empty"),
    pytest.param({"prompt_token_ids": [5, VOCAB, 6]}, id="token-id-vocab-size"),
    pytest.param({"prompt_token_ids": [5, -1]}, id="negative-token-id"),
    pytest.param("a text prompt", id="text-without-tokenizer"),
    pytest.param({"something": [1, 2]}, id="dict-without-prompt"),
    pytest.param(3.5, id="not-a-prompt"),
])
def test_invalid_prompt_rejected_then_engine_still_serves(llm, oracle, prompt):
    with pytest.raises(ValueError):
        llm.generate([prompt], greedy(4), use_tqdm=False)
    engine = llm.llm_engine
    with pytest.raises(ValueError):
        engine.add_request("bad", prompt, greedy(4))
    assert not engine.has_unfinished_requests()
    (out,) = llm.generate({"prompt_token_ids": [9, 8, 7]}, greedy(4), use_tqdm=False)
    assert out.outputs[0].token_ids == oracle([9, 8, 7], 4)
    assert_no_leaked_blocks(llm)


def test_empty_token_list_via_add_request(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.llm_engine.add_request("empty", [], greedy(2))
    assert llm.generate([], greedy(2), use_tqdm=False) == []  # no prompts, no outputs


@pytest.mark.parametrize("make_params", [
    pytest.param(lambda: SamplingParams(temperature=-1.0), id="temperature"),
    pytest.param(lambda: SamplingParams(top_p=0.0), id="top_p"),
    pytest.param(lambda: SamplingParams(top_k=-2), id="top_k"),
    pytest.param(lambda: SamplingParams(max_tokens=0), id="max_tokens"),
    pytest.param(lambda: SamplingParams(n=0), id="n"),
    pytest.param(lambda: SamplingParams(min_tokens=5, max_tokens=2), id="min>max"),
    pytest.param(lambda: SamplingParams(presence_penalty=3.0), id="presence_penalty"),
    pytest.param(lambda: SamplingParams(n=2, temperature=0), id="greedy-n2"),
])
def test_bad_sampling_params_raise_value_error(make_params):
    with pytest.raises(ValueError):
        make_params()


@pytest.mark.parametrize("params", [
    pytest.param(SamplingParams(stop_token_ids=[VOCAB]), id="stop-token-out-of-vocab"),
    pytest.param(SamplingParams(logit_bias={VOCAB + 3: 1.0}), id="logit-bias-out-of-vocab"),
    pytest.param(SamplingParams(allowed_token_ids=[1, VOCAB]), id="allowed-out-of-vocab"),
    pytest.param(SamplingParams(logprobs=21), id="too-many-logprobs"),
    pytest.param(SamplingParams(stop="x"), id="stop-string-without-tokenizer"),
    pytest.param(SamplingParams(bad_words=["x"]), id="bad-words-without-tokenizer"),
])
def test_params_rejected_by_the_engine(llm, oracle, params):
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [4, 5, 6]}], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    (out,) = llm.generate({"prompt_token_ids": [4, 5, 6]}, greedy(3), use_tqdm=False)
    assert out.outputs[0].token_ids == oracle([4, 5, 6], 3)
    assert_no_leaked_blocks(llm)


def test_one_bad_prompt_in_a_batch_adds_none_of_it(llm, oracle):
    prompts = [{"prompt_token_ids": [4, 5]}, {"prompt_token_ids": [6, 7]},
               {"prompt_token_ids": [1, VOCAB + 1]}]
    with pytest.raises(ValueError):
        llm.generate(prompts, greedy(3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert_no_leaked_blocks(llm)
    with pytest.raises(ValueError):  # one SamplingParams per prompt, or exactly one
        llm.generate(prompts[:2], [greedy(3)] * 3, use_tqdm=False)
    outs = llm.generate(prompts[:2], [greedy(3), greedy(5)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert outs[1].outputs[0].token_ids == oracle([6, 7], 5)


def test_duplicate_request_id_rejected(llm):
    engine = llm.llm_engine
    engine.add_request("dup", [3, 4, 5], greedy(3))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", [6, 7], greedy(3))
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaked_blocks(llm)


def test_prompt_at_the_length_limit_is_capped(llm, oracle):
    """The longest accepted prompt leaves room for one token and stops at max_model_len."""
    prompt = [(5 * i) % (VOCAB - 3) + 3 for i in range(MAX_MODEL_LEN - 3)]
    (out,) = llm.generate({"prompt_token_ids": prompt}, greedy(50), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert len(prompt) + len(out.outputs[0].token_ids) == MAX_MODEL_LEN
    assert out.outputs[0].token_ids == oracle(prompt, 3)
    assert_no_leaked_blocks(llm)


def test_prompt_of_exactly_max_model_len_gets_one_token(llm, oracle):
    prompt = [(7 * i) % (VOCAB - 3) + 3 for i in range(MAX_MODEL_LEN)]
    (out,) = llm.generate({"prompt_token_ids": prompt}, greedy(5), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == oracle(prompt, 1)
    assert_no_leaked_blocks(llm)


def test_unknown_engine_argument_is_type_error(folder):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(folder, max_num_seq=4)  # typo of max_num_seqs
    with pytest.raises(ValueError):
        LLM(folder, scheduling_policy="lifo")
    with pytest.raises(ValueError):
        LLM(folder, block_size=3)


def test_kv_cache_too_small_for_max_model_len(folder):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(folder, block_size=BLOCK, num_gpu_blocks_override=8, max_model_len=MAX_MODEL_LEN)


# ---------------------------------------------------------------------------------------------
# DELTA outputs (n > 1, prompt logprobs) and the async engine's output kinds
# ---------------------------------------------------------------------------------------------


def _outputs_of(engine, rid: str, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_delta_outputs_of_two_sequences(llm):
    """As vLLM: a sequence is in a DELTA output only when it has something new, its finish is
    reported once, the prompt's logprobs come with the first output only, and the deltas add
    up to the cumulative outputs."""
    from jaxvllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    prompt = [3, 14, 15, 92]
    base = dict(n=2, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    first, second = (c.token_ids for c in
                     _outputs_of(engine, "cumulative", prompt, SamplingParams(**base))[-1].outputs)
    stop = next(t for t in first[:4] if t not in second)  # ends sequence 0 early only
    cumulative = _outputs_of(engine, "cum-stop", prompt,
                             SamplingParams(**base, stop_token_ids=[stop]))[-1]
    deltas = _outputs_of(engine, "delta", prompt, SamplingParams(
        **base, stop_token_ids=[stop], output_kind=RequestOutputKind.DELTA))
    for c in cumulative.outputs:
        mine = [d for o in deltas for d in o.outputs if d.index == c.index]
        assert sum((d.token_ids for d in mine), []) == c.token_ids
        assert all(d.token_ids for d in mine)
        assert [d.finish_reason for d in mine if d.finish_reason] == [c.finish_reason]
    assert len(cumulative.outputs[0].token_ids) < 8 == len(cumulative.outputs[1].token_ids)
    assert deltas[0].prompt_logprobs == cumulative.prompt_logprobs
    assert all(o.prompt_logprobs is None for o in deltas[1:])
    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    assert_no_leaked_blocks(llm)


def test_async_engine_gives_each_reader_its_output_kind(folder):
    """The async engine runs requests cumulative and its streams hand each reader the kind it
    asked for: a reader that lags behind still gets every DELTA token, FINAL_ONLY one
    output; the engine's token counts stay right."""
    import asyncio

    from jaxvllm.engine.async_engine import AsyncLLMEngine
    from jaxvllm.sampling_params import RequestOutputKind

    class Recorder:
        def __init__(self):
            self.finished = []

        def record(self, scheduler_stats, iteration):
            self.finished += iteration.finished

        def log(self):
            pass

    recorder = Recorder()
    engine = AsyncLLMEngine(LLM(folder, **SMALL).llm_engine, stat_loggers=[recorder],
                            log_stats=False)
    prompt = {"prompt_token_ids": [3, 14, 15, 92]}

    async def read(rid, kind, lag=0.0):
        stream = await engine.add_requests([(rid, prompt, greedy(8, output_kind=kind))])
        await asyncio.sleep(lag)
        return [out async for _, out in stream]

    async def main():
        return (await read("c", RequestOutputKind.CUMULATIVE),
                await read("d", RequestOutputKind.DELTA, lag=1.0),
                await read("f", RequestOutputKind.FINAL_ONLY))

    try:
        cumulative, delta, final = asyncio.run(main())
    finally:
        engine.shutdown()
    want = cumulative[-1].outputs[0].token_ids
    assert len(want) == 8
    assert sum((o.outputs[0].token_ids for o in delta), []) == want
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == want
    assert {f.request_id: f.num_generation_tokens for f in recorder.finished} == {
        "c": 8, "d": 8, "f": 8}
