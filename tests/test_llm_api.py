"""The offline API with a real tokenizer: `LLM()` (the embedded SmolLM2-135M-Instruct) and its
`generate` / `chat`, with vLLM's prompt forms, output fields, sampling and stop semantics.

One engine serves the whole module. Greedy continuation of PROMPT (checked below) is
" Paris.\\n\\nThe answer is:", which the stop-string cases rely on.
"""

from __future__ import annotations

import math

import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.outputs import CompletionOutput, Logprob, RequestOutput

PROMPT = "The capital of France is"
OTHERS = ["Once upon a time", "def fibonacci(n):", "The three primary colors are"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # The API is what is tested here: the layers as a scan compile its many sampler programs
    # ~2.5x faster than unrolled (the default, which tests/test_server_smollm2.py and the
    # unrolled-vs-scan tests in tests/test_step_inputs.py cover).
    return LLM(max_model_len=512, max_num_seqs=8, seed=0, unroll_layers=False)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def gen(llm: LLM, prompts, params) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


def one(llm: LLM, prompt, params) -> CompletionOutput:
    (out,) = gen(llm, prompt, params)
    (completion,) = out.outputs
    return completion


@pytest.fixture(scope="module")
def paris_output(llm) -> RequestOutput:
    (out,) = gen(llm, PROMPT, greedy(8))
    return out


@pytest.fixture(scope="module")
def paris(paris_output) -> CompletionOutput:
    """Greedy continuation of PROMPT, 8 tokens."""
    return paris_output.outputs[0]


@pytest.fixture(scope="module")
def chat_answer(llm) -> RequestOutput:
    """Greedy answer to QUESTION; it ends with EOS well before 12 tokens."""
    (out,) = llm.chat(QUESTION, greedy(12), use_tqdm=False)
    return out


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1


# ---------------------------------------------------------------------------------------------
# generate: prompts, order, fields
# ---------------------------------------------------------------------------------------------


def test_capital_of_france(llm, tok, paris_output):
    out = paris_output
    assert isinstance(out, RequestOutput)
    completion = out.outputs[0]
    assert completion.text.startswith(" Paris"), completion.text
    assert completion.text == " Paris.\n\nThe answer is:"  # the stop tests rely on it

    # the fields, as vLLM names them
    assert isinstance(out.request_id, str)
    assert out.prompt == PROMPT
    assert out.prompt_token_ids == list(tok.encode(PROMPT))
    assert out.prompt_logprobs is None
    assert out.finished is True
    assert isinstance(out.num_cached_tokens, int) and out.num_cached_tokens >= 0
    assert len(out.outputs) == 1
    assert completion.index == 0
    assert len(completion.token_ids) == 8
    assert tok.decode(completion.token_ids) == completion.text
    assert completion.finish_reason == "length"
    assert completion.stop_reason is None
    assert completion.finished()
    assert completion.logprobs is None and completion.cumulative_logprob is None
    assert_no_leaks(llm)


def test_outputs_come_back_in_prompt_order(llm):
    prompts = [PROMPT] + OTHERS
    alone = [one(llm, p, greedy(3)).token_ids for p in prompts]
    for order in (prompts, prompts[::-1]):
        outs = gen(llm, order, greedy(3))
        assert [o.prompt for o in outs] == order
        assert len({o.request_id for o in outs}) == len(order)
        assert [o.outputs[0].token_ids for o in outs] == [alone[prompts.index(p)] for p in order]


def test_prompt_forms(llm, tok, paris):
    ids = list(tok.encode(PROMPT))
    outs = gen(llm, [PROMPT, ids, {"prompt_token_ids": ids}, {"prompt": PROMPT}], greedy(4))
    assert [o.outputs[0].token_ids for o in outs] == [paris.token_ids[:4]] * 4
    assert [o.outputs[0].text for o in outs] == [" Paris.\n\n"] * 4
    assert [o.prompt_token_ids for o in outs] == [ids] * 4
    assert outs[0].prompt == PROMPT and outs[3].prompt == PROMPT
    assert outs[1].prompt is None and outs[2].prompt is None
    # a single token-id list is one prompt, not a list of prompts
    (single,) = gen(llm, ids, greedy(2))
    assert single.outputs[0].token_ids == paris.token_ids[:2]


def test_one_sampling_params_per_prompt(llm, paris):
    params = [greedy(3), greedy(5, stop="\n"),
              SamplingParams(temperature=1.0, seed=1, max_tokens=7, ignore_eos=True)]
    outs = gen(llm, [PROMPT, PROMPT, PROMPT], params)
    assert outs[0].outputs[0].token_ids == paris.token_ids[:3]
    assert outs[1].outputs[0].text == " Paris." and outs[1].outputs[0].finish_reason == "stop"
    assert len(outs[2].outputs[0].token_ids) == 7
    with pytest.raises(ValueError):
        gen(llm, [PROMPT, PROMPT], [greedy(3)])
    assert_no_leaks(llm)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=6)
    alone = one(llm, PROMPT, params).token_ids
    # in the middle of a batch of other requests, seeded, unseeded and greedy
    outs = gen(llm, [OTHERS[0], PROMPT, OTHERS[1], OTHERS[2]],
               [SamplingParams(temperature=0.8, max_tokens=3), params, greedy(6),
                SamplingParams(temperature=1.2, seed=99, max_tokens=6)])
    assert outs[1].outputs[0].token_ids == alone
    # other seeds sample something else
    outs = gen(llm, [PROMPT] * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=6)
                                   for s in (1, 2, 3)])
    assert any(o.outputs[0].token_ids != alone for o in outs)


def test_top_k_1_is_greedy(llm, paris):
    outs = gen(llm, [PROMPT, PROMPT], [SamplingParams(temperature=1.0, top_k=1, seed=seed,
                                                      max_tokens=5) for seed in (None, 7)])
    assert [o.outputs[0].token_ids for o in outs] == [paris.token_ids[:5]] * 2


def test_n_outputs(llm):
    (out,) = gen(llm, PROMPT, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6,
                                             ignore_eos=True))
    assert out.finished
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # the same request again gives the same four samples
    (again,) = gen(llm, PROMPT, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6,
                                             ignore_eos=True))
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_no_leaks(llm)


# ---------------------------------------------------------------------------------------------
# Stop conditions
# ---------------------------------------------------------------------------------------------

# Greedy: " Paris" "." "\n" "\n" "The" " answer" " is" ":". Every case runs in one batch.
STOP_CASES = {
    # id: (SamplingParams, text, number of tokens kept, finish_reason, stop_reason)
    "newline": (greedy(8, stop="\n"), " Paris.", 3, "stop", "\n"),
    "newline-included": (greedy(8, stop="\n", include_stop_str_in_output=True),
                         " Paris.\n", 3, "stop", "\n"),
    "spans-two-tokens": (greedy(8, stop=["answer is"]), " Paris.\n\nThe ", 7, "stop", "answer is"),
    "spans-included": (greedy(8, stop=["answer is"], include_stop_str_in_output=True),
                       " Paris.\n\nThe answer is", 7, "stop", "answer is"),
    "inside-a-token": (greedy(8, stop=["ari"]), " P", 1, "stop", "ari"),
    "inside-a-token-included": (greedy(8, stop=["ari"], include_stop_str_in_output=True),
                                " Pari", 1, "stop", "ari"),
    "earliest-of-two": (greedy(8, stop=["The", "."]), " Paris", 2, "stop", "."),
    # the max_tokens-th token completes the stop string: vLLM reports the stop
    "on-the-last-allowed-token": (greedy(2, stop=["."]), " Paris", 2, "stop", "."),
    "not-reached": (greedy(8, stop=["Berlin", "xyz"]), " Paris.\n\nThe answer is:", 8,
                    "length", None),
    "max-tokens-1": (greedy(1), " Paris", 1, "length", None),
    "max-tokens-5": (greedy(5), " Paris.\n\nThe", 5, "length", None),
}


@pytest.fixture(scope="module")
def stop_outputs(llm) -> dict[str, CompletionOutput]:
    outs = gen(llm, [PROMPT] * len(STOP_CASES), [case[0] for case in STOP_CASES.values()])
    return {name: out.outputs[0] for name, out in zip(STOP_CASES, outs)}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_stop_strings_and_max_tokens(stop_outputs, paris, case):
    _, text, num_tokens, finish_reason, stop_reason = STOP_CASES[case]
    c = stop_outputs[case]
    assert (c.text, c.finish_reason, c.stop_reason) == (text, finish_reason, stop_reason)
    # the token that completed the stop string is kept in token_ids (as vLLM)
    assert c.token_ids == paris.token_ids[:num_tokens]


def test_stop_token_ids(llm, paris):
    newline = paris.token_ids[2]
    c = one(llm, PROMPT, greedy(8, stop_token_ids=[newline]))
    assert c.token_ids == paris.token_ids[:3]
    assert c.finish_reason == "stop"
    assert c.stop_reason == newline
    assert c.text == " Paris."  # as vLLM: the stop token's own text is left out...
    kept = one(llm, PROMPT, greedy(8, stop_token_ids=[newline], include_stop_str_in_output=True))
    assert kept.text == " Paris.\n"  # ...unless include_stop_str_in_output


def test_stop_strings_wait_for_min_tokens(llm, paris):
    # "." completes at the second token; with min_tokens=3 only a later "." may stop
    c = one(llm, PROMPT, greedy(12, stop=["."], min_tokens=3))
    assert len(c.token_ids) > 3 or c.finish_reason == "length"
    assert c.token_ids[:3] == paris.token_ids[:3]


def test_eos_stops_unless_ignored(llm, tok, chat_answer):
    c = chat_answer.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in c.token_ids[:-1]
    assert tok.decode([tok.eos_token_id]) not in c.text  # special tokens are skipped
    (out,) = llm.chat(QUESTION, greedy(len(c.token_ids) + 2, ignore_eos=True), use_tqdm=False)
    ignored = out.outputs[0]
    assert ignored.finish_reason == "length"
    assert ignored.token_ids[:len(c.token_ids)] == c.token_ids
    assert len(ignored.token_ids) == len(c.token_ids) + 2


def test_min_tokens_keeps_generating(llm, tok, chat_answer):
    natural = chat_answer.outputs[0].token_ids
    assert natural[-1] == tok.eos_token_id
    min_tokens = len(natural) + 3
    (out,) = llm.chat(QUESTION, greedy(min_tokens + 2, min_tokens=min_tokens), use_tqdm=False)
    c = out.outputs[0]
    assert len(c.token_ids) >= min_tokens
    assert tok.eos_token_id not in c.token_ids[:min_tokens]
    assert c.token_ids[:len(natural) - 1] == natural[:-1]  # the same until eos was banned


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


def check_logprobs(c: CompletionOutput, k: int) -> None:
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for token, entry in zip(c.token_ids, c.logprobs):
        assert len(entry) >= k and token in entry
        assert all(isinstance(v, Logprob) and v.logprob <= 1e-6 for v in entry.values())
        assert all(isinstance(v.decoded_token, str) for v in entry.values())
        top = sorted(entry.values(), key=lambda v: v.rank)
        assert [v.logprob for v in top] == sorted((v.logprob for v in top), reverse=True)
        assert {v.rank for v in entry.values()} >= set(range(1, k + 1))
        assert entry[token].rank >= 1
    total = sum(entry[token].logprob for token, entry in zip(c.token_ids, c.logprobs))
    assert math.isclose(c.cumulative_logprob, total, rel_tol=1e-5, abs_tol=1e-5)


def test_logprobs_greedy(llm, paris):
    c = one(llm, PROMPT, greedy(6, logprobs=3))
    assert c.token_ids == paris.token_ids[:6]
    check_logprobs(c, 3)
    for token, entry in zip(c.token_ids, c.logprobs):
        assert entry[token].logprob == max(v.logprob for v in entry.values())
        assert entry[token].rank == 1
    assert c.cumulative_logprob < 0


def test_logprobs_sampled(llm):
    params = SamplingParams(temperature=1.5, seed=11, max_tokens=6, logprobs=3)
    c = one(llm, PROMPT, params)
    check_logprobs(c, 3)
    # asking for logprobs does not change what is sampled
    plain = one(llm, PROMPT, SamplingParams(temperature=1.5, seed=11, max_tokens=6))
    assert plain.token_ids == c.token_ids


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


def test_chat_capital_of_france(llm, tok, chat_answer):
    out = chat_answer
    assert "Paris" in out.outputs[0].text
    ids = tok.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert out.prompt_token_ids == list(ids)
    # a list of conversations gives one output each, in order
    outs = llm.chat([QUESTION, [{"role": "user", "content": "Say hello."}]],
                    greedy(12), use_tqdm=False)
    assert len(outs) == 2 and outs[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert_no_leaks(llm)


# ---------------------------------------------------------------------------------------------
# output kinds (the engine's step outputs)
# ---------------------------------------------------------------------------------------------


def _step_outputs(llm: LLM, params: SamplingParams, rid: str) -> list[RequestOutput]:
    engine = llm.llm_engine
    engine.add_request(rid, PROMPT, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_output_kinds(llm, paris):
    """CUMULATIVE (default): an output per step with everything so far; DELTA: only what is
    new, which adds up to the same; FINAL_ONLY: one output, when the request finishes."""
    from jaxvllm.sampling_params import RequestOutputKind

    cumulative = _step_outputs(llm, greedy(8), "kind-cumulative")
    assert len(cumulative) == 8
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 9))
    last = cumulative[-1].outputs[0]
    assert last.token_ids == paris.token_ids and last.text == paris.text

    delta = _step_outputs(llm, greedy(8, output_kind=RequestOutputKind.DELTA), "kind-delta")
    assert [len(o.outputs[0].token_ids) for o in delta] == [1] * 8
    assert sum((o.outputs[0].token_ids for o in delta), []) == paris.token_ids
    assert "".join(o.outputs[0].text for o in delta) == paris.text
    assert [o.finished for o in delta] == [False] * 7 + [True]

    final = _step_outputs(llm, greedy(8, output_kind=RequestOutputKind.FINAL_ONLY), "kind-final")
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == paris.token_ids
    assert final[0].outputs[0].text == paris.text
    assert_no_leaks(llm)


def test_generate_leaves_the_callers_params_as_they_were(llm, paris):
    from jaxvllm.sampling_params import RequestOutputKind

    params = greedy(8)
    assert one(llm, PROMPT, params).token_ids == paris.token_ids
    assert params.output_kind == RequestOutputKind.CUMULATIVE


def test_bad_output_kind_is_a_value_error():
    with pytest.raises(ValueError, match="output_kind must be one of"):
        SamplingParams(output_kind=7)
