"""Incremental detokenization with the embedded SmolLM2 tokenizer: the Rust DecodeStream
path and the window path give the text a whole decode gives, character by character
(multi-byte characters split over tokens, special tokens kept or skipped), and stop strings
cut it the same way."""

from __future__ import annotations

import pytest

from jaxvllm import SamplingParams
from jaxvllm.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "The capital of France is Paris. It has 2,148,271 inhabitants (2020).",
    "Déjà vu: naïve café, 日本語のテキスト, emoji 🚀🎉 and a combining e\u0301.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from jaxvllm.tokenizer import load_tokenizer

    return load_tokenizer(None)


class WindowOnly:
    """The tokenizer without its Rust backend in sight: the window path runs."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, **kwargs):
        return self._tokenizer.decode(ids, **kwargs)


def detokenize(tokenizer, prompt, output, **params):
    """(text, stop string found or None, tokens appended) of `output` after `prompt`."""
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(**params))
    for n, token in enumerate(output, start=1):
        if (stop := detok.append(token)) is not None:
            return detok.text, stop, n
    return detok.text, None, len(output)


def output_ids(tokenizer, text, special=False):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if special:  # special tokens in the middle, as a chat model emits them
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        ids = ids[:5] + [im_start] + ids[5:9] + [tokenizer.eos_token_id] + ids[9:]
    return ids


def test_the_rust_stream_is_used_where_it_decodes_alike(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams())
    assert detok._stream is not None
    assert IncrementalDetokenizer(WindowOnly(tokenizer), [1, 2], SamplingParams())._stream is None
    assert IncrementalDetokenizer(tokenizer, [1, 2],
                                  SamplingParams(detokenize=False))._stream is None


@pytest.mark.parametrize("special", [False, True], ids=["plain", "special-tokens"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_equals_a_whole_decode(tokenizer, special, skip_special_tokens):
    prompt = tokenizer.encode("Question: say something.\nAnswer:", add_special_tokens=False)
    for text in TEXTS:
        output = output_ids(tokenizer, text, special)
        whole = tokenizer.decode(prompt + output, skip_special_tokens=skip_special_tokens)
        context = tokenizer.decode(prompt[-6:], skip_special_tokens=skip_special_tokens)
        prefix = tokenizer.decode(prompt[:-6], skip_special_tokens=skip_special_tokens)
        want = whole[len(prefix) + len(context):]
        for tok in (tokenizer, WindowOnly(tokenizer)):
            got, stop, _ = detokenize(tok, prompt, output,
                                      skip_special_tokens=skip_special_tokens)
            assert (got, stop) == (want, None), (type(tok).__name__, text)


def test_unknown_ids_add_no_text(tokenizer):
    """Ids past the tokenizer's vocabulary (a model's padded vocabulary) decode to nothing,
    as in a whole decode."""
    output = output_ids(tokenizer, "Hello world") + [len(tokenizer) + 7] + output_ids(
        tokenizer, " again")
    for tok in (tokenizer, WindowOnly(tokenizer)):
        assert detokenize(tok, [1], output)[0] == "Hello world again"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_alike(tokenizer, include):
    text = TEXTS[1]
    output = output_ids(tokenizer, text)
    stop = "テキ"  # inside a run of multi-byte characters
    results = {type(tok).__name__: detokenize(tok, [1], output, stop=[stop],
                                              include_stop_str_in_output=include)
               for tok in (tokenizer, WindowOnly(tokenizer))}
    (got, found, n), other = results.values()
    assert other == (got, found, n)
    end = text.index(stop) + (len(stop) if include else 0)
    assert found == stop and got == text[:end] and n < len(output)


@pytest.mark.parametrize("stop", [None, ["テキ"], ["zzz"]], ids=["no-stop", "stop", "no-match"])
def test_append_tokens_equals_appending_one_by_one(tokenizer, stop):
    """`append_tokens` (a multi-step call's tokens at once) leaves the text, the stop string
    and the tokens taken as appending them one by one does."""
    output = output_ids(tokenizer, TEXTS[1], special=True)
    for tok in (tokenizer, WindowOnly(tokenizer)):
        want = detokenize(tok, [1], output, stop=stop, min_tokens=3)
        detok = IncrementalDetokenizer(tok, [1], SamplingParams(stop=stop, min_tokens=3))
        found, n = None, 0
        for chunk in (output[:5], output[5:13], output[13:]):
            found, taken = detok.append_tokens(chunk)
            n += taken
            if found is not None:
                break
        assert (detok.text, found, n) == want
        assert detok.num_output_tokens == n
