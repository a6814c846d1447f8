"""What the completion and chat handlers share: the model-name check, tokenization off the
event loop, the context-length rules, request ids, errors, handing requests to the engine,
server-sent events and log-probability formatting."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncGenerator, AsyncIterator, Optional, Sequence

from pydantic import BaseModel

from jaxvllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from jaxvllm.entrypoints.openai.protocol import (ChatTemplateFields, ErrorInfo, ErrorResponse,
                                                 UsageInfo, random_id)
from jaxvllm.outputs import RequestOutput

# Log-probabilities of -inf cannot be written as JSON; OpenAI sends this instead.
MIN_LOGPROB = -9999.0

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestEntityTooLargeError",
                422: "UnprocessableEntityError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


class ServingError(Exception):
    """An error answered with an OpenAI error body: `{"error": {message, type, param, code}}`."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 err_type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or _ERROR_TYPES.get(status, "BadRequestError")

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.err_type,
                                             param=self.param, code=self.status)).model_dump()


_PARAM = re.compile(r"^([A-Za-z_]+)")


def bad_request(error: Exception, fields: Sequence[str] = ()) -> ServingError:
    """A 400 from a ValueError whose message starts with the field name (as `SamplingParams`
    and the request models write them)."""
    message = str(error)
    match = _PARAM.match(message)
    param = match.group(1) if match and match.group(1) in fields else None
    return ServingError(message, 400, param)


def engine_error(error: Exception) -> ServingError:
    if isinstance(error, EngineDeadError):
        return ServingError(str(error), 503)
    return ServingError(f"internal error: {error}", 500)


class OpenAIServing:
    """`shared`: another handler whose tokenizer copy and tokenizer thread to reuse."""

    def __init__(self, engine: AsyncLLMEngine, model_names: Sequence[str],
                 shared: Optional["OpenAIServing"] = None):
        self.engine = engine
        self.model_names = list(model_names)
        self.max_model_len = engine.max_model_len
        if shared is not None:
            self.tokenizer = shared.tokenizer
            self._pool, self._counter = shared._pool, shared._counter
            return
        # The engine thread decodes with the engine's tokenizer; requests are encoded with a
        # copy, on one worker thread, so that neither blocks the event loop nor shares it.
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxvllm-tokenizer")
        self._counter = itertools.count()

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.model_names:
            raise ServingError(f"The model `{name}` does not exist.", 404, "model")

    def require_tokenizer(self, what: str, param: str) -> None:
        if self.tokenizer is None:
            raise ServingError(f"{what} needs a tokenizer and this model has none; send token "
                               f"ids instead", 400, param)

    async def off_loop(self, fn, *args):
        """Run tokenizer work on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, request: ChatTemplateFields, documents=None) -> str:
        """The request's conversation through the model's chat template, as the request asks
        (ValueError when it fails)."""
        conversation = []
        for m in request.messages:
            entry = {"role": m.role, "content": m.text()}
            if m.name is not None:
                entry["name"] = m.name
            entry.update(m.model_extra or {})
            conversation.append(entry)
        kwargs = dict(request.chat_template_kwargs or {})
        if request.tools is not None:
            kwargs["tools"] = request.tools
        if documents is not None:
            kwargs["documents"] = documents
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template=request.chat_template, **kwargs)
        except Exception as e:  # jinja2 errors, "no chat template", role order, ...
            raise ValueError(f"messages: the chat template failed: {e}") from e

    @staticmethod
    def truncate(ids: list[int], truncate_prompt_tokens: Optional[int]) -> list[int]:
        if truncate_prompt_tokens is None:
            return ids
        if truncate_prompt_tokens < 1:
            raise ServingError(f"truncate_prompt_tokens must be at least 1, got "
                               f"{truncate_prompt_tokens}", 400, "truncate_prompt_tokens")
        return ids[-truncate_prompt_tokens:]

    def resolve_max_tokens(self, requested: Optional[int], num_prompt_tokens: int,
                           prompt_param: str, max_tokens_param: str = "max_tokens") -> int:
        """vLLM's context-length rules: the prompt must leave room for one token; an explicit
        max_tokens must fit; no max_tokens means up to the context length."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise ServingError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {num_prompt_tokens} input tokens. Please reduce the length of "
                f"the input.", 400, prompt_param)
        room = limit - num_prompt_tokens
        if requested is None:
            return room
        if requested > room:
            raise ServingError(
                f"'{max_tokens_param}' is too large: {requested}. This model's maximum context "
                f"length is {limit} tokens and your request has {num_prompt_tokens} input "
                f"tokens ({requested} > {limit} - {num_prompt_tokens}).", 400, max_tokens_param)
        return requested

    # -- ids -----------------------------------------------------------------------------------

    def response_id(self, prefix: str, raw_request, body_request_id: Optional[str]) -> str:
        """`prefix-<X-Request-Id>` when the client sent one, else `prefix-<request_id>` (a
        body field, vLLM's extension) or `prefix-<random>`; the response's X-Request-Id
        header carries the same base."""
        base = raw_request.headers.get("x-request-id") if raw_request is not None else None
        base = base or body_request_id or random_id()
        if raw_request is not None:
            raw_request.state.request_id = base
        return f"{prefix}-{base}"

    def engine_ids(self, response_id: str, count: int) -> list[str]:
        """Engine request ids, unique even when clients reuse an X-Request-Id."""
        serial = next(self._counter)
        return [f"{response_id}-{i}.{serial}" for i in range(count)]

    # -- the engine ----------------------------------------------------------------------------

    async def add_requests(self, items: list, *, arrival: float, priority: int,
                           fields: Sequence[str], response_id: str,
                           raw_request) -> RequestStream:
        """Hand `items` (engine id, prompt, sampling params) to the engine as one stream: a
        request the engine refuses is a 400 (naming one of `fields`), a dead engine a 503."""
        try:
            stream = await self.engine.add_requests(items, arrival_time=arrival,
                                                    priority=priority)
        except ValueError as e:
            raise bad_request(e, fields) from e
        except EngineDeadError as e:
            raise engine_error(e) from e
        if raw_request is not None:
            raw_request.state.log_info = f"id={response_id}"
        return stream

    # -- log-probabilities ---------------------------------------------------------------------

    def token_str(self, token_id: int, logprob, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        text = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
        return text


def clamp_logprob(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def now() -> int:
    return int(time.time())


async def final_outputs(stream: RequestStream, count: int) -> list[RequestOutput]:
    """The last output of each of the stream's `count` requests (a dead engine is a 503)."""
    finals: list[Optional[RequestOutput]] = [None] * count
    try:
        async for index, output in stream:
            finals[index] = output
    except EngineDeadError as e:
        raise engine_error(e) from e
    finally:
        stream.close()
    return finals


def padded(entries: Optional[Sequence], count: int) -> list:
    """The first `count` per-token logprob dicts, padded with None to `count`."""
    entries = list(entries or [])[:count]
    return entries + [None] * (count - len(entries))


def note_usage(raw_request, usage: UsageInfo, reasons) -> None:
    """Usage for the server's one log line per request."""
    if raw_request is None:
        return
    reasons = ",".join(sorted({r for r in reasons if r})) or "-"
    raw_request.state.log_info = (f"{getattr(raw_request.state, 'log_info', '')} "
                                  f"prompt_tokens={usage.prompt_tokens} "
                                  f"completion_tokens={usage.completion_tokens} "
                                  f"finish={reasons}").strip()


# -- server-sent events ------------------------------------------------------------------------


def sse_event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


async def sse_stream(events: AsyncGenerator[str, None],
                     stream: RequestStream) -> AsyncIterator[str]:
    """`events` as sent: a failure becomes an error event, the engine requests are closed
    however it ends (a client gone included), and `[DONE]` comes last."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        error = e if isinstance(e, ServingError) else engine_error(e)
        yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
    finally:
        stream.close()
        await events.aclose()
    yield "data: [DONE]\n\n"
