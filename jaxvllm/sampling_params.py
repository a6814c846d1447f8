"""`SamplingParams`: the per-request decoding settings, with vLLM's field names, defaults and
validation rules, so that `from jaxvllm import SamplingParams` is a drop-in for vLLM's.

Every invalid value raises `ValueError` whose message names the field, the value received and
the rule it broke. Normalisations done in `__post_init__` (as vLLM does):

- `stop` (a string or a list) becomes a list, `stop_token_ids` a list (both `[]` when None);
- `top_k=-1` becomes `0` (both mean "off");
- `seed=-1` becomes None;
- `logprobs=True` / `prompt_logprobs=True` become 1;
- a temperature in (0, 0.01) is raised to 0.01 (smaller ones overflow the softmax), with a
  warning;
- a greedy request (temperature < 1e-5) gets `top_p=1`, `top_k=0`, `min_p=0`, and must have
  `n == 1`.

Token ids can only be range-checked against a vocabulary: the engine calls
`verify_token_ids(vocab_size)` when it accepts the request.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)."""
_MIN_TEMP = 1e-2
"""Positive temperatures below this are raised to it (vLLM's `_MAX_TEMP`)."""


class RequestOutputKind(enum.IntEnum):
    """What each `RequestOutput` of a request carries (vLLM's `RequestOutputKind`)."""

    CUMULATIVE = 0
    """Every output so far (tokens, text, logprobs), at every step."""
    DELTA = 1
    """Only what is new since the request's last output."""
    FINAL_ONLY = 2
    """Nothing until the request finishes, then all of it (`LLM.generate`)."""


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as_list(name: str, value: Any, rule: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} {rule}, got {value!r}")
    return list(value)


@dataclass
class SamplingParams:
    """Sampling parameters for text generation (vLLM's `SamplingParams`)."""

    n: int = 1
    """Number of output sequences to return for the prompt."""

    best_of: int | None = None
    """Kept for compatibility with older vLLM: only None or a value equal to `n` is accepted
    (vLLM V1 dropped best-of-n selection)."""

    presence_penalty: float = 0.0
    """In [-2, 2]. Subtracted from the logit of every token that already appears in the
    output; > 0 encourages new tokens, < 0 repetition."""

    frequency_penalty: float = 0.0
    """In [-2, 2]. Subtracted from a token's logit once per time it appears in the output."""

    repetition_penalty: float = 1.0
    """> 0. For tokens seen in the prompt or the output, positive logits are divided by it
    and negative logits multiplied by it; > 1 discourages repetition, 1 is off."""

    temperature: float = 1.0
    """>= 0. Divides the logits before sampling; 0 (anything below 1e-5) means greedy."""

    top_p: float = 1.0
    """In (0, 1]. Keep the smallest set of most likely tokens whose probability mass reaches
    `top_p`; 1 is off."""

    top_k: int = 0
    """Keep the `top_k` most likely tokens; 0 (or -1, normalised to 0) is off."""

    min_p: float = 0.0
    """In [0, 1]. Drop tokens whose probability is below `min_p` times the probability of the
    most likely token; 0 is off."""

    seed: int | None = None
    """Seed of this request's random stream: with a seed, the sampled tokens do not depend
    on the other requests in the batch. -1 is normalised to None."""

    stop: str | list[str] | None = None
    """Strings that stop generation when produced; normalised to a list. The stop string is
    left out of the output unless `include_stop_str_in_output`."""

    stop_token_ids: list[int] | None = None
    """Token ids that stop generation when sampled; normalised to a list. The token is kept
    in the output token ids (its text too unless it is a special token)."""

    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token."""

    max_tokens: int | None = 16
    """Maximum number of tokens to generate; None means up to the model's context length
    (resolved by the engine)."""

    min_tokens: int = 0
    """Minimum number of tokens to generate before EOS or `stop_token_ids` may be sampled
    (they are masked out until then)."""

    logprobs: int | None = None
    """Number of most likely tokens whose log probabilities are returned with each output
    token, in addition to the sampled token's own (so up to `logprobs + 1` entries).
    Log probabilities are those of the raw model distribution (vLLM's default
    `logprobs_mode="raw_logprobs"`)."""

    prompt_logprobs: int | None = None
    """Number of log probabilities to return per prompt token."""

    detokenize: bool = True
    """Whether to turn the output token ids into text."""

    skip_special_tokens: bool = True
    """Whether to leave special tokens out of the output text."""

    spaces_between_special_tokens: bool = True
    """Whether to put spaces between special tokens in the output text."""

    include_stop_str_in_output: bool = False
    """Whether a matched stop string is kept at the end of the output text."""

    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to that token's logit before sampling (string keys from JSON
    are converted to int)."""

    allowed_token_ids: list[int] | None = None
    """When set (and non-empty), only these tokens can be sampled."""

    bad_words: list[str] | None = None
    """Words that must not be generated: the last token of a word is banned whenever the
    tokens generated so far end with the word's other tokens."""

    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """What the engine's outputs for this request carry (`LLM.generate` asks for FINAL_ONLY:
    building a cumulative output of every request at every step costs the host time that
    grows with the sequences)."""

    # ----- derived, set in __post_init__ / by the engine -----

    output_text_buffer_length: int = field(default=0, init=False, repr=False)
    """Characters to hold back from streamed text until a stop string can be ruled out."""

    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self._normalise()
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax; turn them off.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling (temperature < "
                                 f"{_SAMPLING_EPS}), got n={self.n}")
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _normalise(self) -> None:
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
                             f"got {self.output_kind!r}") from None
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if _is_int(self.seed) and self.seed == -1:
            self.seed = None
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list("stop", self.stop, "must be a string or a list of strings")
        self.stop_token_ids = ([] if self.stop_token_ids is None else
                               _as_list("stop_token_ids", self.stop_token_ids,
                                        "must be a list of ints"))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got "
                                 f"{type(self.logit_bias).__name__} {self.logit_bias!r}")
            bias = {}
            for tok, value in self.logit_bias.items():
                try:
                    tok_id = int(tok)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids (ints), got "
                                     f"{tok!r}") from None
                if isinstance(tok, float) and tok != tok_id:
                    raise ValueError(f"logit_bias keys must be token ids (ints), got {tok!r}")
                bias[tok_id] = value
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list("allowed_token_ids", self.allowed_token_ids,
                                              "must be None or a non-empty list of ints")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = _as_list("bad_words", self.bad_words, "must be a list of strings")
        if _is_real(self.temperature) and 0 < self.temperature < _MIN_TEMP:
            logger.warning("temperature %s is below %s, which may overflow the softmax; "
                           "raised to %s", self.temperature, _MIN_TEMP, _MIN_TEMP)
            self.temperature = _MIN_TEMP

    def _verify_args(self) -> None:
        def bad(name: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"{name} {rule}, got {value!r}")

        if not _is_int(self.n):
            raise bad("n", self.n, "must be an int")
        if self.n < 1:
            raise bad("n", self.n, "must be at least 1")
        if self.best_of is not None:
            if not _is_int(self.best_of):
                raise bad("best_of", self.best_of, "must be an int or None")
            if self.best_of != self.n:
                raise ValueError(f"best_of must be None or equal to n (best-of-n selection is "
                                 f"not supported), got best_of={self.best_of!r} with n={self.n}")
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
            value = getattr(self, name)
            if not _is_real(value) or not lo <= value <= hi:
                raise bad(name, value, f"must be a number in [{lo:g}, {hi:g}]")
        if not _is_real(self.repetition_penalty) or not (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", self.repetition_penalty,
                      "must be a finite number greater than 0")
        if not _is_real(self.temperature) or math.isnan(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a non-negative number")
        if not math.isfinite(self.temperature):
            raise bad("temperature", self.temperature, "must be finite")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be a number in (0, 1]")
        if not _is_int(self.top_k):
            raise bad("top_k", self.top_k, "must be an int")
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "must be 0 or -1 (off) or at least 1")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be a number in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", self.seed, "must be an int or None")
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                raise bad("max_tokens", self.max_tokens, "must be an int or None")
            if self.max_tokens < 1:
                raise bad("max_tokens", self.max_tokens, "must be at least 1")
        if not _is_int(self.min_tokens):
            raise bad("min_tokens", self.min_tokens, "must be an int")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be at least 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens={self.max_tokens}, got "
                             f"{self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value):
                    raise bad(name, value, "must be an int or None")
                if value < 0:
                    raise bad(name, value, "must be non-negative")
        if not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", self.stop, "must be a string or a list of strings")
        if any(not s for s in self.stop):
            raise bad("stop", self.stop, "cannot contain an empty string")
        if self.stop and not self.detokenize:
            raise bad("stop", self.stop, "(stop strings) need detokenize=True")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a list of ints")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative token ids")
        if self.logit_bias is not None:
            for tok, value in self.logit_bias.items():
                if not _is_real(value) or not math.isfinite(value):
                    raise ValueError(f"logit_bias values must be finite numbers, got "
                                     f"{value!r} for token {tok}")
                if tok < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {tok}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise bad("allowed_token_ids", self.allowed_token_ids,
                          "must be None or a non-empty list of token ids")
            if not all(_is_int(t) for t in self.allowed_token_ids):
                raise bad("allowed_token_ids", self.allowed_token_ids, "must be a list of ints")
            if any(t < 0 for t in self.allowed_token_ids):
                raise bad("allowed_token_ids", self.allowed_token_ids,
                          "must be non-negative token ids")
        if self.bad_words is not None:
            if not all(isinstance(w, str) for w in self.bad_words):
                raise bad("bad_words", self.bad_words, "must be a list of strings")
        for name in ("ignore_eos", "detokenize", "skip_special_tokens",
                     "spaces_between_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise bad(name, value, "must be a bool")

    # ------------------------------------------------------------------------------------

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the most likely token (temperature < 1e-5)."""
        return self.temperature < _SAMPLING_EPS

    @property
    def all_stop_token_ids(self) -> set[int]:
        """`stop_token_ids` plus the model's EOS id(s) once the engine has added them: the
        ids that `min_tokens` keeps from being sampled."""
        return self._all_stop_token_ids

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """`bad_words` as token id sequences, set by `update_from_tokenizer`."""
        return self._bad_words_token_ids

    def update_from_generation_config(self, generation_config: dict[str, Any],
                                      model_eos_token_id: int | None = None) -> None:
        """Add the model's EOS id(s) to `all_stop_token_ids` (for `min_tokens`) and, unless
        `ignore_eos`, the generation config's extra EOS ids to `stop_token_ids` (as vLLM)."""
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos = generation_config.get("eos_token_id") if generation_config else None
        if eos is None:
            return
        eos_ids = {eos} if _is_int(eos) else set(eos)
        eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                self.stop_token_ids = sorted(eos_ids | set(self.stop_token_ids))

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenize `bad_words` (each word as written and, when it tokenizes differently to
        the same length, with a leading space, as vLLM does)."""
        if not self.bad_words:
            return
        seqs: list[list[int]] = []
        for word in self.bad_words:
            plain = list(tokenizer.encode(word, add_special_tokens=False))
            if not plain:
                continue
            seqs.append(plain)
            spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if spaced and spaced != plain and len(spaced) == len(plain):
                seqs.append(spaced)
        self._bad_words_token_ids = seqs

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if a token id in `logit_bias`, `allowed_token_ids`,
        `stop_token_ids` or the tokenized `bad_words` is outside [0, vocab_size)."""
        def check(name: str, ids) -> None:
            bad_ids = sorted({t for t in ids if not 0 <= t < vocab_size})
            if bad_ids:
                raise ValueError(f"{name} contains out-of-vocabulary token ids {bad_ids} "
                                 f"(vocabulary size {vocab_size})")

        if self.logit_bias:
            check("logit_bias", self.logit_bias.keys())
        if self.allowed_token_ids:
            check("allowed_token_ids", self.allowed_token_ids)
        check("stop_token_ids", self.stop_token_ids)
        if self._bad_words_token_ids:
            check("bad_words", [t for seq in self._bad_words_token_ids for t in seq])

    def clone(self) -> SamplingParams:
        """A deep copy."""
        return copy.deepcopy(self)

    def with_output_kind(self, kind: RequestOutputKind) -> SamplingParams:
        """These params if they ask for `kind` already, else a copy that does."""
        if self.output_kind == kind:
            return self
        params = self.clone()
        params.output_kind = kind
        return params
