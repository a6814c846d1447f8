"""Asynchronous scheduling with the real runner: step N+1 is scheduled and dispatched before
step N is collected, its decode rows reading N's sampled tokens on the device.

Outputs must be those of each prompt run alone (greedy), of the engine scheduling in order
(seeded sampling, stop strings and stop token ids found one step late, preemption under a
small KV cache, a batch mixing params that need the host's token history), and every block
must be free again afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.simple_generate import SimpleGenerator

CASE = "llama_gqa"
VOCAB = 256
MAX_MODEL_LEN = 96
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
              max_model_len=MAX_MODEL_LEN, seed=0, attention_backend="reference")


class LetterTokenizer:
    """Token t decodes to one letter, so text position i is output token i."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True) -> str:
        return "".join(chr(ord("a") + int(t) % 26) for t in ids)


def make_llm(folder, **kwargs) -> LLM:
    llm = LLM(folder, **{**CONFIG, **kwargs})
    llm.llm_engine.tokenizer = LetterTokenizer()
    return llm


def random_prompt(rs: np.random.RandomState, n: int) -> list[int]:
    return [int(t) for t in rs.randint(3, VOCAB, n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine._in_flight is None
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1


def assert_each_alone(zoo, prompts, max_tokens, got) -> None:
    """Greedy outputs `got` (from `generate`) are those of each prompt run alone."""
    gen = SimpleGenerator(zoo.loaded(CASE).model)
    for prompt, m, ((tokens, _, reason, _),) in zip(prompts, max_tokens, got, strict=True):
        assert tokens == gen.generate([prompt], m)[0] and reason == "length"


def abort_one_of_two(llm: LLM, rs: np.random.RandomState, steps_before_abort: int) -> dict:
    """Two greedy requests of 30 tokens, "x" aborted after a few steps: "y" still gets all
    its tokens. Returns the last output of each."""
    engine = llm.llm_engine
    for rid, n in (("x", 10), ("y", 14)):
        engine.add_request(rid, random_prompt(rs, n), greedy(30))
    outputs = {}
    for _ in range(steps_before_abort):
        for out in engine.step():
            outputs[out.request_id] = out
    engine.abort_request("x")
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs["y"].finished and len(outputs["y"].outputs[0].token_ids) == 30
    assert_idle(llm)
    return outputs


@pytest.fixture(scope="module")
def folder(zoo) -> str:
    return str(zoo.case(CASE).path)


@pytest.fixture(scope="module")
def ahead(folder) -> LLM:
    return make_llm(folder, async_scheduling=True)


@pytest.fixture(scope="module")
def in_order(folder) -> LLM:
    return make_llm(folder, async_scheduling=False)


def scheduled_ahead(llm: LLM) -> int:
    return llm.llm_engine.stats()["steps_scheduled_ahead"]


def test_greedy_outputs_match_each_prompt_alone(zoo, ahead):
    rs = np.random.RandomState(0)
    lengths, max_tokens = [5, 40, 17, 3, 60, 33], [16, 5, 20, 9, 12, 16]
    prompts = [random_prompt(rs, n) for n in lengths]
    before = scheduled_ahead(ahead)
    got = generate(ahead, prompts, [greedy(m) for m in max_tokens])
    assert scheduled_ahead(ahead) - before > 20
    assert_each_alone(zoo, prompts, max_tokens, got)
    assert_idle(ahead)


def test_seeded_sampling_and_stops_match_scheduling_in_order(ahead, in_order):
    """Seeded random sampling draws the same tokens; a stop string, a stop token id and a
    max_tokens end each request where scheduling in order ends it (the token computed after
    a stop is dropped)."""
    rs = np.random.RandomState(1)
    prompts = [random_prompt(rs, n) for n in (9, 30, 14, 22, 6)]
    free = generate(in_order, prompts[:1], SamplingParams(temperature=1.0, seed=5,
                                                            max_tokens=20, ignore_eos=True))
    text, tokens = free[0][0][1], free[0][0][0]
    params = [SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             stop=[text[6:8]]),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, max_tokens=15),
              SamplingParams(temperature=1.0, seed=7, max_tokens=12,
                             stop_token_ids=[tokens[4]]),
              greedy(10, stop_token_ids=[7, 8, 9]),
              SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=11)]
    want = generate(in_order, prompts, params)
    got = generate(ahead, prompts, params)
    assert got == want
    assert want[0][0][2:] == ("stop", text[6:8])  # the stop string did cut it
    assert_idle(ahead)


def test_preemption_with_steps_scheduled_ahead(folder, zoo):
    """A KV cache too small for the batch: requests are preempted while their next token is
    being sampled, recomputed later, and still generate what they generate alone."""
    llm = make_llm(folder, async_scheduling=True, num_gpu_blocks_override=40)
    rs = np.random.RandomState(2)
    prompts = [random_prompt(rs, n) for n in (30, 25, 20, 28)]
    got = generate(llm, prompts, greedy(40))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert scheduled_ahead(llm) > 20
    gen = SimpleGenerator(zoo.loaded(CASE).model)
    for prompt, ((tokens, *_),) in zip(prompts, got):
        assert tokens == gen.generate([prompt], 40)[0]
    assert_idle(llm)


def test_params_needing_token_history_fall_back_to_in_order(ahead, in_order):
    """Penalties, bad words, min_tokens or logprobs: the step after one where such a row
    samples is scheduled only once that step is collected, and outputs are unchanged."""
    rs = np.random.RandomState(3)
    prompts = [random_prompt(rs, n) for n in (8, 12, 16)]
    params = [greedy(12), greedy(12, repetition_penalty=1.5, presence_penalty=0.5),
              greedy(12, logprobs=2)]
    before = scheduled_ahead(ahead)
    got = ahead.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert scheduled_ahead(ahead) == before  # every step had a row of the last two
    want = in_order.generate([{"prompt_token_ids": p} for p in prompts], params,
                             use_tqdm=False)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    assert_idle(ahead)


def test_abort_with_two_steps_in_flight(ahead):
    outputs = abort_one_of_two(ahead, np.random.RandomState(4), steps_before_abort=6)
    assert len(outputs["x"].outputs[0].token_ids) < 30



def test_seeded_row_next_to_a_newly_admitted_row_needing_history(ahead, in_order):
    """A step scheduled ahead whose batch also admits a request with penalties builds every
    row's sampling inputs the long way: the seeded row's position must still count the
    output being sampled in flight, or it would draw the same random numbers twice."""
    rs = np.random.RandomState(6)
    x_prompt, y_prompt = random_prompt(rs, 7), random_prompt(rs, 9)
    x_params = SamplingParams(temperature=1.0, seed=21, max_tokens=16, ignore_eos=True)
    y_params = greedy(6, repetition_penalty=1.3)
    want = generate(in_order, [x_prompt], x_params)[0][0][0]

    engine = ahead.llm_engine
    before = scheduled_ahead(ahead)
    engine.add_request("x", x_prompt, x_params)
    outputs = {}
    for _ in range(4):
        for out in engine.step():
            outputs[out.request_id] = out
    engine.add_request("y", y_prompt, y_params)  # admitted into a step scheduled ahead
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert scheduled_ahead(ahead) - before >= 3
    assert outputs["x"].outputs[0].token_ids == want
    assert len(outputs["y"].outputs[0].token_ids) == 6
    assert_idle(ahead)
