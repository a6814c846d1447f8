"""POST /v1/completions: prompts (a string, strings, token ids, lists of token ids) to
`AsyncLLMEngine` requests, and their outputs to a response or a stream of SSE chunks."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional, Union

from jaxvllm.engine.async_engine import RequestStream
from jaxvllm.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                                 CompletionResponse, CompletionResponseChoice,
                                                 CompletionResponseStreamChoice,
                                                 CompletionStreamResponse, UsageInfo)
from jaxvllm.entrypoints.openai.serving_base import (OpenAIServing, ServingError, bad_request,
                                                     clamp_logprob, final_outputs, note_usage,
                                                     now, padded, sse_event, sse_stream)

FIELDS = tuple(CompletionRequest.model_fields)


class _Prompt:
    def __init__(self, text: Optional[str], token_ids: list[int]):
        self.text = text
        self.token_ids = token_ids


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request=None
                                ) -> Union[CompletionResponse, AsyncIterator[str]]:
        arrival = time.monotonic()
        self.check_model(request.model)
        prompts = await self._prompts(request)
        # echo with max_tokens=0 (vLLM): the prompt alone, e.g. to score it with logprobs;
        # one token is generated and dropped
        prompt_only = bool(request.echo) and request.max_tokens == 0
        max_tokens = 1 if prompt_only else request.max_tokens
        try:
            params = [request.to_sampling_params(self.resolve_max_tokens(
                max_tokens, len(p.token_ids), "prompt")) for p in prompts]
        except ValueError as e:
            raise bad_request(e, FIELDS) from e
        response_id = self.response_id("cmpl", raw_request, request.request_id)
        engine_ids = self.engine_ids(response_id, len(prompts))
        items = [(eid, {"prompt_token_ids": p.token_ids, "prompt": p.text}, sp)
                 for eid, p, sp in zip(engine_ids, prompts, params)]
        stream = await self.add_requests(items, arrival=arrival, priority=request.priority,
                                         fields=FIELDS, response_id=response_id,
                                         raw_request=raw_request)
        view = _PromptOnly() if prompt_only else _Generated()
        if request.stream:
            return sse_stream(self._stream(request, stream, prompts, view, response_id,
                                           raw_request), stream)
        return await self._full(request, stream, prompts, view, response_id, raw_request)

    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not raw:
            raise ServingError("prompt must not be empty", 400, "prompt")
        if any(isinstance(p, str) for p in raw):
            self.require_tokenizer("a text prompt", "prompt")

        def encode_all():
            out = []
            for p in raw:
                if isinstance(p, str):
                    ids = self.encode(p, request.add_special_tokens)
                    text = p
                else:
                    ids = list(p)
                    text = None
                if not ids:
                    raise ServingError("prompt must not be empty", 400, "prompt")
                if request.truncate_prompt_tokens is not None:
                    ids = self.truncate(ids, request.truncate_prompt_tokens)
                    text = None
                if text is None and request.echo and self.tokenizer is not None:
                    if all(0 <= t < self.engine.vocab_size for t in ids):
                        text = self.tokenizer.decode(ids)
                out.append(_Prompt(text, ids))
            return out

        return await self.off_loop(encode_all)

    # -- non-streaming ------------------------------------------------------------------------

    async def _full(self, request, stream: RequestStream, prompts, view, response_id,
                    raw_request) -> CompletionResponse:
        finals = await final_outputs(stream, len(prompts))
        choices = []
        num_generated = 0
        as_ids = bool(request.return_tokens_as_token_ids)
        for prompt, final in zip(prompts, finals):
            for c in final.outputs:
                text, token_ids, entries, finish, stop_reason = view(c)
                generated = list(token_ids)
                if request.echo:
                    text = (prompt.text or "") + text
                    token_ids = prompt.token_ids + token_ids
                    entries = padded(final.prompt_logprobs, len(prompt.token_ids)) + entries
                logprobs = (self._logprobs(token_ids, entries, 0, as_ids)
                            if request.logprobs is not None else None)
                choices.append(CompletionResponseChoice(
                    index=len(choices), text=text, logprobs=logprobs,
                    finish_reason=finish, stop_reason=stop_reason,
                    prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
                    token_ids=generated if request.return_token_ids else None))
                num_generated += len(generated)
        usage = UsageInfo.of(sum(len(p.token_ids) for p in prompts), num_generated)
        note_usage(raw_request, usage, [c.finish_reason for c in choices])
        return CompletionResponse(id=response_id, created=now(), model=self.model_name,
                                  choices=choices, usage=usage)

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(self, request: CompletionRequest, stream: RequestStream, prompts, view,
                      response_id, raw_request) -> AsyncIterator[str]:
        n = request.n
        total = len(prompts) * n
        created = now()
        text_used = [0] * total  # characters of the cumulative text already sent
        tokens_used = [0] * total
        chars_sent = [0] * total  # for logprobs' text_offset (echoed prompt included)
        echoed = [False] * total
        finished: list[Optional[str]] = [None] * total
        include_usage, continuous = request.stream_usage()
        as_ids = bool(request.return_tokens_as_token_ids)
        async for index, output in stream:
            prompt = prompts[index]
            for c in output.outputs:
                i = index * n + c.index
                if finished[i] is not None:
                    continue
                full_text, token_ids, all_entries, finish, stop_reason = view(c)
                text = full_text[text_used[i]:]
                new_ids = token_ids[tokens_used[i]:]
                entries = all_entries[tokens_used[i]:]
                if request.echo and not echoed[i]:
                    echoed[i] = True
                    text = (prompt.text or "") + text
                    new_ids = prompt.token_ids + new_ids
                    entries = padded(output.prompt_logprobs, len(prompt.token_ids)) + entries
                wants_tokens = request.logprobs is not None or request.return_token_ids
                if not text and not finish and not (new_ids and wants_tokens):
                    continue  # nothing to say yet (text held back for a stop string)
                logprobs = (self._logprobs(new_ids, entries, chars_sent[i], as_ids)
                            if request.logprobs is not None else None)
                choice = CompletionResponseStreamChoice(
                    index=i, text=text, logprobs=logprobs, finish_reason=finish,
                    stop_reason=stop_reason)
                if request.return_token_ids:
                    choice.token_ids = new_ids
                text_used[i] = max(text_used[i], len(full_text))
                tokens_used[i] = len(token_ids)
                chars_sent[i] += len(text)
                finished[i] = finish
                chunk = CompletionStreamResponse(id=response_id, object="text_completion",
                                                 created=created, model=self.model_name,
                                                 choices=[choice])
                if continuous:
                    chunk.usage = UsageInfo.of(len(prompt.token_ids), tokens_used[i])
                yield sse_event(chunk)
        usage = UsageInfo.of(sum(len(p.token_ids) for p in prompts), sum(tokens_used))
        note_usage(raw_request, usage, finished)
        if include_usage:
            yield sse_event(CompletionStreamResponse(
                id=response_id, object="text_completion", created=created,
                model=self.model_name, choices=[], usage=usage))

    def _logprobs(self, token_ids: list[int], entries: list, first_offset: int,
                  as_ids: bool) -> CompletionLogProbs:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = first_offset
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            token = self.token_str(token_id, chosen, as_ids)
            tokens.append(token)
            token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            top.append(None if entry is None else
                       {self.token_str(t, lp, as_ids): clamp_logprob(lp.logprob)
                        for t, lp in entry.items()})
            offsets.append(offset)
            offset += len(token)
        return CompletionLogProbs(text_offset=offsets, token_logprobs=token_logprobs,
                                  tokens=tokens, top_logprobs=top)


class _Generated:
    """What a choice shows of a completion: (text, token ids, logprob entries, finish reason,
    stop reason)."""

    def __call__(self, c):
        token_ids = list(c.token_ids)
        entries = padded(c.logprobs, len(token_ids))
        return c.text, token_ids, entries, c.finish_reason, c.stop_reason


class _PromptOnly:
    """echo with max_tokens=0: nothing of the one token generated."""

    def __call__(self, c):
        return "", [], [], "length" if c.finish_reason else None, None
