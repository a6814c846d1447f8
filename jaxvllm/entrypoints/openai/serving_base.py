"""What the completion and chat handlers share: the model-name check, tokenization off the
event loop, the context-length rules, request ids, errors and log-probability formatting."""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from jaxvllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from jaxvllm.entrypoints.openai.protocol import (ChatMessage, ErrorInfo, ErrorResponse,
                                                 random_id)

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

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool,
                    continue_final_message: bool, chat_template: Optional[str],
                    template_kwargs: Optional[dict], tools=None, documents=None) -> str:
        """The conversation through the model's chat template (ValueError when it fails)."""
        conversation = []
        for m in messages:
            entry = {"role": m.role, "content": m.text()}
            if m.name is not None:
                entry["name"] = m.name
            entry.update(m.model_extra or {})
            conversation.append(entry)
        kwargs = dict(template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        if documents is not None:
            kwargs["documents"] = documents
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template,
                **kwargs)
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
