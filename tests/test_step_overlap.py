"""LLMEngine.step pipelined with the device: a step's outputs are built while the next step runs.

A runner double with `execute_async` runs each step when it is dispatched (reading its
requests then, as the device program does) and hands the result over only at `result()`; it
also checks the engine's side of the contract (one step in flight, the requests' tokens left
alone until it is collected). With it, outputs must be those of each prompt run alone, stop
strings must cut where they did before, and the token that a request computed after its stop
string (it was already in the next step) must never show.

The tiny random Llama has no tokenizer; a one-letter-per-token one stands in, so that stop
strings can be picked from the known greedy continuations.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.engine.async_engine import AsyncLLMEngine
from jaxvllm.simple_generate import SimpleGenerator

CASE = "llama_gqa"
VOCAB = 256
MAX_MODEL_LEN = 96
# One step in flight at a time, collected before the next is scheduled (the doubles below
# check that contract); scheduling ahead of the step in flight: tests/test_async_scheduling.py
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
              max_model_len=MAX_MODEL_LEN, seed=0, async_scheduling=False)


class LetterTokenizer:
    """Token t decodes to one letter, so text position i is output token i."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True) -> str:
        return "".join(chr(ord("a") + int(t) % 26) for t in ids)


TOK = LetterTokenizer()


class _Handle:
    def __init__(self, runner: "DeferredRunner", result, rows):
        self._runner, self._result, self._rows = runner, result, rows

    def result(self):
        assert self._runner.in_flight is self, "steps collected out of order, or twice"
        for req, computed, num_tokens in self._rows:
            assert (req.num_computed_tokens, req.num_tokens) == (computed, num_tokens), \
                f"{req.request_id} changed while its step was in flight"
        self._runner.in_flight = None
        return self._result


class DeferredRunner:
    """The runner, with `execute_async`: the step runs at dispatch, `result()` hands it over."""

    def __init__(self, runner):
        self._runner = runner
        self.in_flight = None
        self.num_dispatched = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def execute_async(self, scheduled, vocab_size):
        assert self.in_flight is None, "a step dispatched before the previous one was collected"
        rows = [(s.request, s.request.num_computed_tokens, s.request.num_tokens)
                for s in scheduled]
        self.in_flight = _Handle(self, self._runner.execute(scheduled, vocab_size), rows)
        self.num_dispatched += 1
        return self.in_flight


class BlockingRunner:
    """The runner without `execute_async`: the engine falls back to the blocking `execute`."""

    def __init__(self, runner):
        self._runner = runner

    def __getattr__(self, name):
        if name == "execute_async":
            raise AttributeError(name)
        return getattr(self._runner, name)


class SampleRowCounter:
    """Counts, per request id, the rows of the steps scheduled in a `with` block that sample."""

    def __init__(self, engine):
        self.scheduler = engine.scheduler
        self.counts: dict[str, int] = {}

    def __enter__(self):
        original = self.scheduler.schedule

        def schedule(**kwargs):
            out = original(**kwargs)
            for s in out.scheduled:
                if s.do_sample:
                    self.counts[s.request_id] = self.counts.get(s.request_id, 0) + 1
            return out

        self.scheduler.schedule = schedule
        return self

    def __exit__(self, *exc):
        del self.scheduler.schedule


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_prompt(rs: np.random.RandomState, n: int) -> list[int]:
    return [int(t) for t in rs.randint(3, VOCAB, n)]


def stop_cut(text: str, stop: str) -> tuple[int, int]:
    """(text position of the stop string, number of tokens up to the one completing it)."""
    i = text.find(stop)
    return i, i + len(stop)


def assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1
    assert engine.kv_manager.usage == 0


@pytest.fixture(scope="module")
def folder(zoo) -> str:
    return str(zoo.case(CASE).path)


@pytest.fixture(scope="module")
def oracle(zoo):
    """reference(prompt, max_tokens): greedy tokens of the prompt run alone."""
    gen = SimpleGenerator(zoo.loaded(CASE).model)
    total = MAX_MODEL_LEN + 6
    memo: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_tokens: int) -> list[int]:
        assert len(prompt) + max_tokens <= total
        if tuple(prompt) not in memo:
            memo[tuple(prompt)] = gen.generate([list(prompt)], total - len(prompt))[0]
        return memo[tuple(prompt)][:max_tokens]

    return reference


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    llm = LLM(folder, **CONFIG)
    llm.llm_engine.tokenizer = TOK
    return llm


@pytest.fixture
def deferred(llm):
    engine = llm.llm_engine
    original = engine.runner
    engine.runner = DeferredRunner(original)
    yield engine.runner
    engine.runner = original


@pytest.fixture
def deferred_idle(llm, deferred):
    """The deferred runner; afterwards the idle engine has no step left in flight."""
    yield deferred
    assert deferred.in_flight is None, "an idle engine left a step in flight"


# ---------------------------------------------------------------------------------------------
# Same outputs; outputs returned while the next step runs
# ---------------------------------------------------------------------------------------------


def test_outputs_match_each_prompt_alone(llm, oracle, deferred_idle):
    rs = np.random.RandomState(0)
    lengths, max_tokens = [5, 40, 17, 3, 60, 33], [16, 5, 20, 9, 12, 16]
    prompts = [random_prompt(rs, n) for n in lengths]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [greedy(mt, logprobs=1) for mt in max_tokens], use_tqdm=False)
    assert deferred_idle.num_dispatched > 0
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, mt, out in zip(prompts, max_tokens, outs):
        (c,) = out.outputs
        assert out.finished and c.finish_reason == "length" and c.stop_reason is None
        assert c.token_ids == oracle(prompt, mt)
        assert c.text == TOK.decode(c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
        assert all(t in entry for t, entry in zip(c.token_ids, c.logprobs))
        assert c.cumulative_logprob == pytest.approx(
            sum(entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs)))
    assert_idle(llm)


def test_every_token_is_returned_while_the_next_step_runs(llm, oracle, deferred_idle):
    engine = llm.llm_engine
    rs = np.random.RandomState(1)
    prompts = {f"s{i}": random_prompt(rs, n) for i, n in enumerate([7, 45, 20])}
    max_tokens = {"s0": 12, "s1": 4, "s2": 9}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(max_tokens[rid]))
    seen: dict[str, list] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if outputs and engine.has_unfinished_requests():
            # built while the device ran the step after the one they come from
            assert deferred_idle.in_flight is not None
        for out in outputs:
            seen[out.request_id].append(out)
    for rid, outs in seen.items():
        # one output per token, each with one more token; only the last one finished
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, max_tokens[rid] + 1))
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].outputs[0].token_ids == oracle(prompts[rid], max_tokens[rid])
        assert outs[-1].outputs[0].text == TOK.decode(outs[-1].outputs[0].token_ids)
    assert_idle(llm)


def test_blocking_runner_gives_the_same_outputs_without_overlap(folder):
    """A runner without execute_async: the same outputs, and no host time reported as
    overlapped; with one, the output work is done while a step is in flight."""
    llm = LLM(folder, **CONFIG)
    llm.llm_engine.tokenizer = TOK
    engine = llm.llm_engine
    original = engine.runner
    rs = np.random.RandomState(2)
    prompts = [{"prompt_token_ids": random_prompt(rs, n)} for n in (9, 30, 14)]
    params = [greedy(10, logprobs=2), greedy(6, stop=["q"]), greedy(8, stop=["zz", "k"])]

    engine.runner = BlockingRunner(original)
    blocking = llm.generate(prompts, params, use_tqdm=False)
    stats = engine.stats()
    assert stats["output_host_ms_per_step"] > 0
    assert stats["overlapped_host_ms_per_step"] == 0

    engine.runner = DeferredRunner(original)
    overlapped = llm.generate(prompts, params, use_tqdm=False)
    assert engine.stats()["overlapped_host_ms_per_step"] > 0
    assert engine.runner.in_flight is None
    for a, b in zip(blocking, overlapped):
        (ca,), (cb,) = a.outputs, b.outputs
        assert (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason) == \
            (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason)
        assert ca.logprobs == cb.logprobs
    assert_idle(llm)


# ---------------------------------------------------------------------------------------------
# Stop strings found one step late
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True], ids=["stop-cut", "stop-included"])
def test_stop_string_drops_the_token_computed_after_it(llm, oracle, deferred_idle, include):
    rs = np.random.RandomState(3)
    prompt, other = random_prompt(rs, 11), random_prompt(rs, 26)
    full = oracle(prompt, 24)
    text = TOK.decode(full)
    stop = text[6:8]
    i, kept = stop_cut(text, stop)
    assert kept < 24
    (plain,) = llm.generate({"prompt_token_ids": prompt}, greedy(24, logprobs=1), use_tqdm=False)

    with SampleRowCounter(llm.llm_engine) as rows:
        out, neighbour = llm.generate(
            [{"prompt_token_ids": prompt}, {"prompt_token_ids": other}],
            [greedy(24, stop=[stop], logprobs=1, include_stop_str_in_output=include),
             greedy(20)], use_tqdm=False)
    (c,) = out.outputs
    assert out.finished and (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.token_ids == full[:kept]  # the token completing the stop string is kept
    assert c.text == (text[:i + len(stop)] if include else text[:i])
    assert c.logprobs == plain.outputs[0].logprobs[:kept]
    assert c.cumulative_logprob == pytest.approx(
        sum(entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs)))
    # the request was in one more sampling step than it kept tokens: that token was dropped
    assert rows.counts[out.request_id] == kept + 1
    assert neighbour.outputs[0].token_ids == oracle(other, 20)
    assert_idle(llm)


def test_stop_string_on_the_last_allowed_token_needs_no_extra_step(llm, oracle, deferred_idle):
    rs = np.random.RandomState(4)
    prompt = random_prompt(rs, 13)
    text = TOK.decode(oracle(prompt, 16))
    stop = text[5:7]
    i, kept = stop_cut(text, stop)
    with SampleRowCounter(llm.llm_engine) as rows:
        (out,) = llm.generate({"prompt_token_ids": prompt}, greedy(kept, stop=[stop]),
                              use_tqdm=False)
    (c,) = out.outputs
    assert (c.text, c.finish_reason, c.stop_reason) == (text[:i], "stop", stop)
    assert len(c.token_ids) == kept
    assert rows.counts[out.request_id] == kept  # finished on its length: never rescheduled
    assert_idle(llm)


def test_stop_string_in_one_of_two_sampled_sequences(llm, deferred_idle):
    """The stopped child's extra token is dropped while its sibling keeps running."""
    rs = np.random.RandomState(5)
    prompt = {"prompt_token_ids": random_prompt(rs, 10)}
    sampled = dict(n=2, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True, logprobs=1)
    (free,) = llm.generate(prompt, SamplingParams(**sampled), use_tqdm=False)
    texts = [c.text for c in free.outputs]
    stop = next(s for s in (texts[0][k:k + 2] for k in range(2, 12)) if s not in texts[1])

    with SampleRowCounter(llm.llm_engine) as rows:
        (out,) = llm.generate(prompt, SamplingParams(stop=[stop], **sampled), use_tqdm=False)
    first, second = out.outputs
    i, kept = stop_cut(texts[0], stop)
    assert (first.text, first.finish_reason, first.stop_reason) == (texts[0][:i], "stop", stop)
    assert first.token_ids == free.outputs[0].token_ids[:kept]
    assert first.logprobs == free.outputs[0].logprobs[:kept]
    assert rows.counts[f"0_{out.request_id}"] == kept + 1
    assert kept + 1 < len(second.token_ids), "the sibling should outlive the dropped token"
    assert (second.token_ids, second.text, second.finish_reason) == (
        free.outputs[1].token_ids, texts[1], "length")
    assert_idle(llm)


# ---------------------------------------------------------------------------------------------
# Aborts with a step in flight; the async engine
# ---------------------------------------------------------------------------------------------


def test_abort_and_reuse_an_id_while_its_step_is_in_flight(llm, oracle, deferred_idle):
    engine = llm.llm_engine
    rs = np.random.RandomState(6)
    old, new, other = random_prompt(rs, 9), random_prompt(rs, 6), random_prompt(rs, 12)
    engine.add_request("x", old, greedy(20))
    engine.add_request("y", other, greedy(14))
    for _ in range(4):
        engine.step()
    assert deferred_idle.in_flight is not None
    assert any(r.request_id == "x" for r in engine.scheduler.running)
    engine.abort_request("x")
    engine.add_request("x", new, greedy(6))  # the step in flight still computes the old "x"
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.prompt_token_ids != old, "the aborted request made progress"
            if out.finished:
                finished[out.request_id] = out
    assert finished["x"].outputs[0].token_ids == oracle(new, 6)
    assert finished["y"].outputs[0].token_ids == oracle(other, 14)
    assert_idle(llm)


def test_abort_all_with_a_step_in_flight_leaves_nothing_running(llm, deferred_idle):
    engine = llm.llm_engine
    for i in range(3):
        engine.add_request(f"a{i}", [5 + i] * 8, greedy(10))
    engine.step()
    engine.step()
    assert deferred_idle.in_flight is not None
    engine.abort_request([f"a{i}" for i in range(3)])
    assert deferred_idle.in_flight is None  # collected and dropped at once
    assert engine.step() == []
    assert_idle(llm)


def test_async_engine_streams_up_to_the_stop(llm, oracle, deferred_idle):
    rs = np.random.RandomState(7)
    prompts = [random_prompt(rs, 15), random_prompt(rs, 40)]
    text = TOK.decode(oracle(prompts[0], 20))
    stop = text[9:11]
    i, kept = stop_cut(text, stop)
    params = [greedy(20, stop=[stop]), greedy(12)]
    engine = AsyncLLMEngine(llm.llm_engine, log_stats=False)

    async def stream(k: int) -> list:
        return [out async for out in engine.generate({"prompt_token_ids": prompts[k]},
                                                     params[k], f"stream{k}")]

    async def both():
        return await asyncio.gather(stream(0), stream(1))

    try:
        streamed = asyncio.run(both())
    finally:
        engine.shutdown()
    for outs, expected, final_text in [(streamed[0], oracle(prompts[0], 20)[:kept], text[:i]),
                                       (streamed[1], oracle(prompts[1], 12), None)]:
        last = outs[-1].outputs[0]
        assert outs[-1].finished and last.token_ids == expected
        assert last.text == (final_text if final_text is not None else TOK.decode(expected))
        for out in outs[:-1]:  # every earlier output is a prefix of the last
            c = out.outputs[0]
            assert not out.finished
            assert c.token_ids == expected[:len(c.token_ids)]
            assert last.text.startswith(c.text)
    assert streamed[0][-1].outputs[0].finish_reason == "stop"
    assert_idle(llm)
