"""SamplingParams: vLLM's defaults, normalisations and validation rules."""

from __future__ import annotations

import math

import pytest

from jaxvllm.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of) == (1, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.max_tokens, p.min_tokens) == (False, 16, 0)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert (p.detokenize, p.skip_special_tokens, p.spaces_between_special_tokens) == (True, True, True)
    assert p.include_stop_str_in_output is False
    assert (p.logit_bias, p.allowed_token_ids, p.bad_words) == (None, None, None)
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6), top_k=-1, seed=-1, logprobs=True,
                       prompt_logprobs=True, logit_bias={"7": 1.5}, allowed_token_ids=(1, 2))
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6]
    assert p.top_k == 0 and p.seed is None
    assert p.logprobs == 1 and p.prompt_logprobs == 1
    assert p.logit_bias == {7: 1.5} and p.allowed_token_ids == [1, 2]
    assert p.output_text_buffer_length == 2
    assert SamplingParams(stop=["ab", "abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(bad_words="foo").bad_words == ["foo"]
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_small_temperature_is_raised_and_zero_is_greedy():
    assert SamplingParams(temperature=0.001).temperature == 0.01
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2, seed=3)
    assert g.is_greedy and g.sampling_type == SamplingType.GREEDY
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(temperature=0.0, n=2)


INVALID = [
    ("n", 0), ("n", 1.5), ("n", -3),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", float("nan")),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.5),
    ("seed", 1.5), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -5),
    ("min_tokens", -1),
    ("logprobs", -1), ("prompt_logprobs", -2), ("logprobs", 2.0),
    ("stop", [""]), ("stop", 5), ("stop", ["ok", 3]),
    ("stop_token_ids", [1, "2"]), ("stop_token_ids", [1.5]), ("stop_token_ids", 3),
    ("stop_token_ids", [-1]),
    ("allowed_token_ids", []), ("allowed_token_ids", [1, "x"]), ("allowed_token_ids", [-3]),
    ("bad_words", [1]),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_values_name_the_field(name, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{name: value})
    msg = str(err.value)
    assert name in msg
    assert repr(value) in msg or str(value) in msg


@pytest.mark.parametrize("bias", [{3: math.inf}, {3: float("nan")}, {3: "big"}, {"x": 1.0}, {-1: 1.0}])
def test_invalid_logit_bias(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_best_of_only_none_or_n():
    assert SamplingParams(n=3, best_of=3).best_of == 3
    assert SamplingParams(n=2).best_of is None
    with pytest.raises(ValueError, match="best_of.*4"):
        SamplingParams(n=2, best_of=4)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens.*max_tokens=4.*5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=50, max_tokens=None).min_tokens == 50


def test_stop_needs_detokenize():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="x", detokenize=False)


def test_verify_token_ids():
    SamplingParams(logit_bias={0: 1.0, 99: -1.0}, allowed_token_ids=[0, 99],
                   stop_token_ids=[99]).verify_token_ids(100)
    for kwargs, field in (({"logit_bias": {100: 1.0}}, "logit_bias"),
                          ({"allowed_token_ids": [3, 100]}, "allowed_token_ids"),
                          ({"stop_token_ids": [1000]}, "stop_token_ids")):
        with pytest.raises(ValueError, match=field + ".*100"):
            SamplingParams(**kwargs).verify_token_ids(100)


class _FakeTokenizer:
    """Word-level: 'a b' -> [1, 2]; a leading space turns a word's id into id + 100."""

    vocab = {"bad": 1, "word": 2, "x": 3}

    def encode(self, text, add_special_tokens=False):
        ids = []
        for i, w in enumerate(text.split(" ")):
            if w:
                ids.append(self.vocab[w] + (100 if i > 0 else 0))
        return ids


def test_bad_words_tokenized_with_and_without_leading_space():
    p = SamplingParams(bad_words=["bad word", "x"])
    p.update_from_tokenizer(_FakeTokenizer())
    assert p.bad_words_token_ids == [[1, 102], [101, 102], [3], [103]]
    with pytest.raises(ValueError, match="bad_words"):
        p.verify_token_ids(103)
    p.verify_token_ids(104)


def test_update_from_generation_config():
    p = SamplingParams(stop_token_ids=[9])
    p.update_from_generation_config({"eos_token_id": [2, 7]}, model_eos_token_id=2)
    assert p.all_stop_token_ids == {2, 7, 9}
    assert sorted(p.stop_token_ids) == [7, 9]
    q = SamplingParams(ignore_eos=True)
    q.update_from_generation_config({"eos_token_id": 5}, model_eos_token_id=2)
    assert q.all_stop_token_ids == {2, 5} and q.stop_token_ids == []


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], logit_bias={1: 1.0}, allowed_token_ids=[1, 2], seed=4)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("b")
    q.logit_bias[2] = 2.0
    q.allowed_token_ids.append(3)
    assert p.stop == ["a"] and p.logit_bias == {1: 1.0} and p.allowed_token_ids == [1, 2]
