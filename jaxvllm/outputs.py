"""What `LLM.generate` returns, with vLLM's names and fields."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Logprob:
    """The log-probability of one token, its rank in the distribution and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the sampled token and the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: Optional[int] = None


class DeltaTracker:
    """Turns one request's cumulative outputs into `RequestOutputKind.DELTA` ones (vLLM's
    semantics): each sequence's tokens, text and logprobs new since the last delta; a
    sequence that produced nothing new is left out, a finished one is reported once; the
    prompt's logprobs come with the first delta only. Returns None when nothing is new."""

    def __init__(self):
        self._sent: dict[int, tuple[int, int, int, bool]] = {}  # index -> tokens, chars,
        self._prompt_logprobs_sent = False                        # logprobs, finish sent

    def __call__(self, out: RequestOutput) -> Optional[RequestOutput]:
        completions = []
        for c in out.outputs:
            tokens, chars, logprobs, finish_sent = self._sent.get(c.index, (0, 0, 0, False))
            new_tokens, new_text = c.token_ids[tokens:], c.text[chars:]
            new_logprobs = None if c.logprobs is None else c.logprobs[logprobs:]
            finishing = c.finished() and not finish_sent
            if not (new_tokens or new_text or finishing):
                continue
            self._sent[c.index] = (len(c.token_ids), len(c.text),
                                   0 if c.logprobs is None else len(c.logprobs), c.finished())
            completions.append(dataclasses.replace(c, text=new_text, token_ids=new_tokens,
                                                   logprobs=new_logprobs))
        if not completions:
            return None
        prompt_logprobs = None if self._prompt_logprobs_sent else out.prompt_logprobs
        self._prompt_logprobs_sent = True
        return dataclasses.replace(out, prompt_logprobs=prompt_logprobs, outputs=completions)
