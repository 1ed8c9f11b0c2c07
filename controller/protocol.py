"""OpenAI API request and response shapes (pydantic), plus the vLLM extensions benchmark clients send.

Requests are strict: an unknown field is a 400 naming the field, and a known field with a value we do not
support (n > 1, logprobs, tools, ...) is a 400 that says so, rather than being silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16


class FieldError(ValueError):
    """A refused value of a named field, raised where pydantic gives no location (a model validator): the
    400's `param` names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


_NO_TEXT = {int, float, bool, type(None)}


def first_invalid_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string in a JSON value that is not valid Unicode (a lone surrogate such as "\\ud800", which
    JSON may carry and no tokenizer can encode), as (its path, the offending character's code point)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"U+{ord(value[exc.start]):04X}"
        return None
    if isinstance(value, list) and not set(map(type, value)) - _NO_TEXT:
        return None  # a list of numbers (token ids): told at C speed, not an item at a time
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if not isinstance(item, (str, dict, list)):
            continue  # numbers (a prompt of token ids) hold no text
        found = first_invalid_text(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def only_values(*values: Any) -> dict:
    """The schema of a field accepted for the API's sake whose only supported values are these: the server
    refuses any other with a 400 saying so, and /openapi.json says the same (it said the field's full range)."""
    return {"enum": list(values)}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _TextRequest(_Request):
    """A request whose text a tokenizer will read: every string must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = first_invalid_text(data)
        if found is not None:
            path, char = found
            raise FieldError(path, f"`{path}` is not valid Unicode: it holds a lone surrogate ({char})")
        return data


class _SamplingFields(_TextRequest):
    """Fields shared by completions and chat completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=128, json_schema_extra=only_values(1))] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, json_schema_extra=only_values(0))] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, json_schema_extra=only_values(0))] = 0.0
    logit_bias: Annotated[dict[str, float] | None, Field(json_schema_extra={"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]})] = None
    # vLLM extensions that benchmark clients send.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    repetition_penalty: Annotated[float | None, Field(json_schema_extra=only_values(None, 1))] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> _SamplingFields:
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "logit_bias": bool(self.logit_bias),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
        }
        for field, bad in unsupported.items():
            if bad:
                raise FieldError(field, f"`{field}` = {getattr(self, field)!r} is not supported (only the default)")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "`stream_options` is only allowed with `stream: true`")
        return self


class CompletionRequest(_SamplingFields):
    # Left to right: a prompt of token ids is tried as list[int] before list[str], which would first collect
    # an error for every id (0.29 s for 800k ids, on the event loop).
    prompt: str | list[int] | list[str] | list[list[int]] = Field(union_mode="left_to_right")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: Annotated[bool, Field(json_schema_extra=only_values(False))] = False
    logprobs: Annotated[int | None, Field(json_schema_extra=only_values(None))] = None
    best_of: Annotated[int | None, Field(json_schema_extra=only_values(None, 1))] = None
    suffix: Annotated[str | None, Field(json_schema_extra=only_values(None))] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported: send one request per prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and min(prompt) < 0:  # min: C speed over a million ids
            raise ValueError("token ids must not be negative")
        return prompt

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        for field, bad in {
            "echo": self.echo,
            "logprobs": self.logprobs is not None,
            "best_of": self.best_of not in (None, 1),
            "suffix": self.suffix is not None,
        }.items():
            if bad:
                raise FieldError(field, f"`{field}` is not supported")
        return self


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[bool, Field(json_schema_extra=only_values(False))] = False
    top_logprobs: Annotated[int | None, Field(json_schema_extra=only_values(None, 0))] = None
    tools: Annotated[list[dict] | None, Field(json_schema_extra={"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]})] = None
    tool_choice: Annotated[Any, Field(json_schema_extra=only_values(None, "none"))] = None
    response_format: Annotated[dict | None, Field(json_schema_extra={"anyOf": [
        {"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"], "additionalProperties": False}]})] = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        for field, bad in {
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs not in (None, 0),
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "response_format": self.response_format not in (None, {"type": "text"}),
        }.items():
            if bad:
                raise FieldError(field, f"`{field}` is not supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise FieldError("max_completion_tokens", "`max_tokens` and `max_completion_tokens` disagree; send one")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeCompletionRequest(_TextRequest):
    """`POST /tokenize` of a prompt (vLLM's extension, which benchmark clients use to check alignment)."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_TextRequest):
    """`POST /tokenize` of chat messages, through the model's chat template."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


# --- responses (plain dicts are built from these for speed in the streaming path) -------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prism-serve"
    root: str  # what the model is (here its registry name, as vLLM gives the served path); clients such as `vllm bench serve` read it
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())
