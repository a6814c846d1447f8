"""Incremental detokenization and stop strings.

Text grows token by token without re-decoding the whole output. With a Hugging Face fast
tokenizer whose decode is its Rust tokenizer's alone (no clean-up of spaces), the Rust
`DecodeStream` does it (~1 us a token instead of ~8 for two Python decodes: a 256-row
multi-step call yields 2,048 tokens). Otherwise a small window of earlier tokens
(`prefix_offset..read_offset`) is decoded with the new ones so that byte-level BPE merges
and leading spaces come out right; text ending in an incomplete UTF-8 character (U+FFFD)
waits for the next token. Both start from the prompt's last tokens as context.
"""

from __future__ import annotations

_WINDOW = 6  # earlier tokens decoded with the new ones (enough for multi-byte characters)


def _decode_stream(tokenizer, context: list[int], skip_special_tokens: bool):
    """(Rust tokenizer, DecodeStream primed with `context`) where `tokenizer.decode` is that
    tokenizer's decode alone; None otherwise (then the window method runs)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if not isinstance(backend, Tokenizer):
        return None
    try:
        return backend, DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except TypeError:  # an older tokenizers: no priming
        return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.num_output_tokens = 0
        self.enabled = params.detokenize and tokenizer is not None
        self.token_ids: list[int] = list(prompt_token_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self._stream = (_decode_stream(tokenizer, self.token_ids, self.skip_special_tokens)
                        if self.enabled else None)
        self.text = ""
        # text not yet released while it could still be the start of a stop string
        self._held = max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add one token; returns the stop string it completed, if any (text is then cut)."""
        if not self.enabled:
            return None
        self.num_output_tokens += 1
        new = self._new_text(token_id)
        if not new:
            return None
        start = max(0, len(self.text) - self._max_stop_len() + 1)
        self.text += new
        if self.num_output_tokens <= self.min_tokens:
            return None  # as vLLM: stop strings count only after min_tokens
        return self._check_stop(start)

    def append_tokens(self, token_ids: list[int]) -> tuple[str | None, int]:
        """`append` each token in turn, up to the first that completes a stop string: (that
        stop string, the tokens appended), else (None, all of them)."""
        if not self.enabled:
            return None, len(token_ids)
        if not self.stop:  # nothing to look for between tokens
            self.num_output_tokens += len(token_ids)
            self.text += "".join(filter(None, map(self._new_text, token_ids)))
            return None, len(token_ids)
        for n, token_id in enumerate(token_ids, start=1):
            if (stop := self.append(token_id)) is not None:
                return stop, n
        return None, len(token_ids)

    def _new_text(self, token_id: int) -> str | None:
        """The text `token_id` completes (None or "" while a character is incomplete)."""
        if self._stream is not None:
            backend, stream = self._stream
            return stream.step(backend, token_id)
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return None
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full[len(prefix):]

    def _max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def _check_stop(self, search_from: int) -> str | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s

    def releasable_text(self, finished: bool) -> str:
        """Text safe to stream: all of it when finished, else minus a possible stop prefix."""
        if finished or not self.stop:
            return self.text
        return self.text[:max(0, len(self.text) - self._held)]
