"""Pydantic models of the OpenAI API as vLLM serves it: requests (with vLLM's extra sampling
fields), responses, stream chunks and the error body.

Request fields follow the order of the OpenAI reference; vLLM's extensions are fenced below
it. Unknown fields are accepted and logged (clients send extras), as vLLM does. Values are
checked by `SamplingParams` in `to_sampling_params`, so a bad value gets the same message as
in the offline API.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxvllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def random_id() -> str:
    return uuid.uuid4().hex


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields and logs their names (once per request)."""

    model_config = ConfigDict(extra="allow")
    log_unknown_fields: ClassVar[bool] = True

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if self.model_extra and self.log_unknown_fields:
            logger.warning("%s: ignoring unknown field(s) %s", type(self).__name__,
                           ", ".join(sorted(self.model_extra)))
        return self


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False  # vLLM: usage in every chunk


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: Optional[int] = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class _ResponseFields(OpenAIBaseModel):
    """The frame of a completion or chat response and of their stream chunks; each response
    narrows `object`, `choices` and `usage` (a field redeclared keeps its place)."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Optional[UsageInfo] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class _SamplingFields(OpenAIBaseModel):
    """Fields the completion and chat requests share, with vLLM's extra sampling fields."""

    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    n: int = 1
    presence_penalty: Optional[float] = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    user: Optional[str] = None

    # --- vLLM extensions ---------------------------------------------------------------------
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    length_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    prompt_logprobs: Optional[int] = None
    priority: int = 0
    request_id: Optional[str] = None
    return_tokens_as_token_ids: Optional[bool] = None
    return_token_ids: Optional[bool] = None

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int],
                         prompt_logprobs: Optional[int]) -> SamplingParams:
        """Raises ValueError naming the field when a value is out of range."""
        if self.use_beam_search:
            raise ValueError("use_beam_search: beam search is not supported")
        return SamplingParams(
            n=self.n, best_of=self.best_of,
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
            top_k=_default(self.top_k, 0), min_p=_default(self.min_p, 0.0), seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words)

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")

    def stream_usage(self) -> tuple[bool, bool]:
        """(usage in a last chunk of its own, usage in every chunk), as stream_options asks."""
        options = self.stream_options
        include_usage = bool(options and options.include_usage)
        return include_usage, bool(include_usage and options.continuous_usage_stats)


def _default(value, default):
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# /v1/completions
# ---------------------------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    # https://platform.openai.com/docs/api-reference/completions/create
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    suffix: Optional[str] = None

    # --- vLLM extensions ---------------------------------------------------------------------
    add_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        self._check_stream_options()
        if self.suffix is not None:
            raise ValueError("suffix: not supported, this server has no fill-in-the-middle "
                             "prompt templates")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: structured outputs are not supported")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs  # echoed prompt tokens get logprobs too
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_token_ids: Optional[list[int]] = None
    token_ids: Optional[list[int]] = None


class CompletionResponse(_ResponseFields):
    id: str = Field(default_factory=lambda: f"cmpl-{random_id()}")
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(CompletionResponseChoice):
    """A choice of a stream chunk: the fields of a whole response's choice."""


class CompletionStreamResponse(_ResponseFields):
    object: str = "text_completion"
    choices: list[CompletionResponseStreamChoice]


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions
# ---------------------------------------------------------------------------------------------


class ChatMessage(OpenAIBaseModel):
    """One message; extra keys (tool_calls, tool_call_id, ...) go to the chat template."""

    log_unknown_fields: ClassVar[bool] = False
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None

    def text(self) -> Optional[str]:
        """The content as one string; a list of parts must hold text parts only."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            kind = part.get("type")
            if kind not in ("text", "input_text"):
                raise ValueError(f"messages: content parts of type {kind!r} are not supported "
                                 f"(text only)")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)


class ChatTemplateFields(OpenAIBaseModel):
    """The conversation and how the chat template renders it: what a chat completion request
    and a chat /tokenize request share."""

    messages: list[ChatMessage]
    tools: Optional[list[dict[str, Any]]] = None

    # --- vLLM extensions ---------------------------------------------------------------------
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class ChatCompletionRequest(ChatTemplateFields, _SamplingFields):
    # https://platform.openai.com/docs/api-reference/chat/create
    model: Optional[str] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = Field(default=None, description="deprecated for "
                                      "max_completion_tokens")
    max_completion_tokens: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None

    # --- vLLM extensions ---------------------------------------------------------------------
    echo: bool = False
    documents: Optional[list[dict[str, str]]] = None

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        self._check_stream_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be non-negative, got {self.top_logprobs}")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: structured outputs are not supported")
        if self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice: tool calling is not supported; send tool_choice "
                             "'none' to render the tools into the prompt only")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be used with "
                             "add_generation_prompt (set it to false)")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float = -9999.0
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: Optional[list[ChatCompletionLogProbsContent]] = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class _ChatChoiceFields(OpenAIBaseModel):
    """What a chat choice and a chat stream choice share besides their message or delta."""

    index: int
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None


class ChatCompletionResponseChoice(_ChatChoiceFields):
    message: ChatResponseMessage


class ChatCompletionResponse(_ResponseFields):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: Optional[list[int]] = None


class DeltaMessage(OpenAIBaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatCompletionResponseStreamChoice(_ChatChoiceFields):
    delta: DeltaMessage


class ChatCompletionStreamResponse(_ResponseFields):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionResponseStreamChoice]


# ---------------------------------------------------------------------------------------------
# /v1/models, /tokenize, /detokenize
# ---------------------------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxvllm"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(ChatTemplateFields):
    model: Optional[str] = None
    return_token_strs: Optional[bool] = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
