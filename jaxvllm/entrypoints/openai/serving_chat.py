"""POST /v1/chat/completions: messages through the model's chat template into one
`AsyncLLMEngine` request with n choices, answered whole or as SSE chunks."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional, Union

from jaxvllm.engine.async_engine import RequestStream
from jaxvllm.entrypoints.openai.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                                 ChatCompletionLogProbsContent,
                                                 ChatCompletionRequest, ChatCompletionResponse,
                                                 ChatCompletionResponseChoice,
                                                 ChatCompletionResponseStreamChoice,
                                                 ChatCompletionStreamResponse, ChatResponseMessage,
                                                 DeltaMessage, UsageInfo)
from jaxvllm.entrypoints.openai.serving_base import (OpenAIServing, ServingError, bad_request,
                                                     clamp_logprob, final_outputs, note_usage,
                                                     now, padded, sse_event, sse_stream)

FIELDS = tuple(ChatCompletionRequest.model_fields)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request=None
                                     ) -> Union[ChatCompletionResponse, AsyncIterator[str]]:
        arrival = time.monotonic()
        self.check_model(request.model)
        self.require_tokenizer("a chat request", "messages")
        if not request.messages:
            raise ServingError("messages must not be empty", 400, "messages")
        try:
            prompt_text, prompt_ids = await self.off_loop(self._render, request)
        except ValueError as e:
            raise bad_request(e, FIELDS) from e
        max_tokens_param = ("max_completion_tokens" if request.max_completion_tokens is not None
                            else "max_tokens")
        max_tokens = self.resolve_max_tokens(request.requested_max_tokens, len(prompt_ids),
                                             "messages", max_tokens_param)
        try:
            params = request.to_sampling_params(max_tokens)
        except ValueError as e:
            raise bad_request(e, FIELDS) from e
        response_id = self.response_id("chatcmpl", raw_request, request.request_id)
        (engine_id,) = self.engine_ids(response_id, 1)
        prompt = {"prompt_token_ids": prompt_ids, "prompt": prompt_text}
        stream = await self.add_requests([(engine_id, prompt, params)], arrival=arrival,
                                         priority=request.priority, fields=FIELDS,
                                         response_id=response_id, raw_request=raw_request)
        echo = self._echo_text(request)
        if request.stream:
            return sse_stream(self._stream(request, stream, prompt_ids, echo, response_id,
                                           raw_request), stream)
        return await self._full(request, stream, prompt_ids, echo, response_id, raw_request)

    def _render(self, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        text = self.render_chat(request, documents=request.documents)
        ids = self.encode(text, request.add_special_tokens)
        if request.truncate_prompt_tokens is not None:
            ids = self.truncate(ids, request.truncate_prompt_tokens)
        return text, ids

    @staticmethod
    def _echo_text(request: ChatCompletionRequest) -> str:
        """With `echo`, the last message's content is repeated before the answer when it is
        the assistant's own (a message being continued), as vLLM does."""
        if not request.echo:
            return ""
        last = request.messages[-1]
        return (last.text() or "") if last.role == "assistant" else ""

    # -- non-streaming ------------------------------------------------------------------------

    async def _full(self, request, stream: RequestStream, prompt_ids, echo, response_id,
                    raw_request) -> ChatCompletionResponse:
        (final,) = await final_outputs(stream, 1)
        as_ids = bool(request.return_tokens_as_token_ids)
        choices = []
        for c in final.outputs:
            logprobs = (self._logprobs(list(c.token_ids), padded(c.logprobs, len(c.token_ids)),
                                       request.top_logprobs or 0, as_ids)
                        if request.logprobs else None)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=ChatResponseMessage(role="assistant", content=echo + c.text),
                logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=list(c.token_ids) if request.return_token_ids else None))
        usage = UsageInfo.of(len(prompt_ids), sum(len(c.token_ids) for c in final.outputs))
        note_usage(raw_request, usage, [c.finish_reason for c in choices])
        return ChatCompletionResponse(
            id=response_id, created=now(), model=self.model_name, choices=choices, usage=usage,
            prompt_token_ids=prompt_ids if request.return_token_ids else None)

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(self, request: ChatCompletionRequest, stream: RequestStream, prompt_ids,
                      echo, response_id, raw_request) -> AsyncIterator[str]:
        n = request.n
        created = now()
        text_used = [0] * n
        tokens_used = [0] * n
        finished: list[Optional[str]] = [None] * n
        include_usage, continuous = request.stream_usage()
        as_ids = bool(request.return_tokens_as_token_ids)
        num_prompt = len(prompt_ids)

        def chunk_json(choices, usage=None) -> str:
            chunk = ChatCompletionStreamResponse(id=response_id, object="chat.completion.chunk",
                                                 created=created, model=self.model_name,
                                                 choices=choices)
            if usage is not None:
                chunk.usage = usage
            return sse_event(chunk)

        # the first chunk of each choice carries the role (and the echoed text)
        for i in range(n):
            choice = ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role="assistant", content=echo),
                logprobs=None, finish_reason=None)
            yield chunk_json([choice], UsageInfo.of(num_prompt, 0) if continuous else None)
        async for _, output in stream:
            for c in output.outputs:
                i = c.index
                if finished[i] is not None:
                    continue
                text = c.text[text_used[i]:]
                new_ids = list(c.token_ids[tokens_used[i]:])
                wants_tokens = request.logprobs or request.return_token_ids
                if not text and not c.finish_reason and not (new_ids and wants_tokens):
                    continue
                logprobs = None
                if request.logprobs:
                    entries = padded(c.logprobs, len(c.token_ids))[tokens_used[i]:]
                    logprobs = self._logprobs(new_ids, entries, request.top_logprobs or 0,
                                              as_ids)
                choice = ChatCompletionResponseStreamChoice(
                    index=i, delta=DeltaMessage(content=text), logprobs=logprobs,
                    finish_reason=c.finish_reason)
                if c.finish_reason is not None:
                    choice.stop_reason = c.stop_reason
                if request.return_token_ids:
                    choice.token_ids = new_ids
                text_used[i] = max(text_used[i], len(c.text))
                tokens_used[i] = len(c.token_ids)
                finished[i] = c.finish_reason
                yield chunk_json([choice],
                                 UsageInfo.of(num_prompt, tokens_used[i]) if continuous else None)
        usage = UsageInfo.of(num_prompt, sum(tokens_used))
        note_usage(raw_request, usage, finished)
        if include_usage:
            yield chunk_json([], usage)

    def _logprobs(self, token_ids: list[int], entries: list, top_k: int,
                  as_ids: bool) -> ChatCompletionLogProbs:
        content = []
        for token_id, entry in zip(token_ids, entries):
            if entry is None:
                continue
            chosen = entry.get(token_id)
            token = self.token_str(token_id, chosen, as_ids)
            top = sorted(((lp.rank or 0, t, lp) for t, lp in entry.items()
                          if lp.rank is not None and 1 <= lp.rank <= top_k),
                         key=lambda r: r[0])
            content.append(ChatCompletionLogProbsContent(
                token=token,
                logprob=clamp_logprob(chosen.logprob) if chosen is not None else -9999.0,
                bytes=list(token.encode("utf-8", errors="replace")),
                top_logprobs=[ChatCompletionLogProb(
                    token=(s := self.token_str(t, lp, as_ids)), logprob=clamp_logprob(lp.logprob),
                    bytes=list(s.encode("utf-8", errors="replace"))) for _, t, lp in top]))
        return ChatCompletionLogProbs(content=content)
