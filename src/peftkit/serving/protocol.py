"""What ``peftkit serve``'s requests may say: the JSON bodies of ``/v1/classify``,
``/v1/completions`` and ``/v1/chat/completions`` as pydantic models (validated after the body
is read within its size limit), and the answers in the shapes OpenAI's API gives (so its
client libraries work unchanged). Every problem is an
:class:`~.workers.ApiError` whose message says what to send instead."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .workers import ApiError, Limits

ROLES = ("system", "user", "assistant")


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def read_json(body: bytes, shape: str) -> dict[str, Any]:
    """The body as a JSON object (``shape`` shows what one looks like)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad(f"the body is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise bad(f"expected a JSON object {shape}")
    return data


def _check(model: type[BaseModel], data: dict[str, Any], limits: Limits, **context: Any) -> Any:
    """``data`` validated as ``model``; the first problem becomes a 400 with its own message."""
    try:
        return model.model_validate(data, context={"limits": limits, **context})
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        raise bad(str(cause) if cause is not None else f"'{error['loc'][0]}': {error['msg']}") from None


class _Body(BaseModel):
    """A request body: fields checked one by one with messages that say what to send; fields
    this server does not read (OpenAI clients send some) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ClassifyRequest(_Body):
    """``POST /v1/classify``: ``{"adapter": NAME, "texts": [...]}``; ``adapter`` may be left out
    when the server has one adapter."""

    adapter: str = Field(None, validate_default=True)
    texts: list[str] = Field(None, validate_default=True)

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter(cls, value: Any, info: ValidationInfo) -> str:
        value = info.context.get("only") if value is None else value
        if not isinstance(value, str):
            raise ValueError(
                "'adapter' must be a string: the name of a loaded adapter (it may be left out when the server has one)"
            )
        return value

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value: Any, info: ValidationInfo) -> list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise ValueError("'texts' must be a non-empty list of strings")
        limit = info.context["limits"].max_texts
        if len(value) > limit:
            raise ValueError(f"{len(value)} texts in one request; at most {limit}")
        return value


class Sampling(_Body):
    """The generation options of a completion or chat request; ``max_tokens`` defaults to the
    request kind's (``default_tokens`` in the context)."""

    model: str = Field(None, validate_default=True)
    max_tokens: int = Field(None, validate_default=True)
    temperature: float = Field(1.0, validate_default=True)
    top_p: float = Field(1.0, validate_default=True)
    stop: list[str] = Field(None, validate_default=True)
    stream: bool = Field(False, validate_default=True)
    n: int = Field(1, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _newer_name(cls, data: Any) -> Any:  # OpenAI's newer name for max_tokens
        if isinstance(data, dict) and data.get("max_tokens") is None and "max_completion_tokens" in data:
            return {**data, "max_tokens": data["max_completion_tokens"]}
        return data

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("'model' must be a string: an adapter name, or the base model's id (GET /v1/models)")
        return value

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, value: Any, info: ValidationInfo) -> int:
        value = info.context["default_tokens"] if value is None else value
        if not _is_int(value) or value < 1:
            raise ValueError("'max_tokens' must be a positive integer")
        limit = info.context["limits"].max_tokens
        if value > limit:
            raise ValueError(f"'max_tokens' is {value}; this server allows at most {limit}")
        return value

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> float:
        return _number("temperature", value, 1.0, 0.0, 2.0)

    @field_validator("top_p", mode="before")
    @classmethod
    def _top_p(cls, value: Any) -> float:
        value = _number("top_p", value, 1.0, 0.0, 1.0)
        if value == 0.0:
            raise ValueError("'top_p' must be above 0 (at most 1)")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        value = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
            raise ValueError("'stop' must be a string or a list of at most 4 non-empty strings")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _stream(cls, value: Any) -> bool:
        return _flag("stream", value)

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value: Any) -> int:
        if value != 1:
            raise ValueError("'n' must be 1: ask once per answer")
        return 1


class _Asking(_Body):
    """What completion and chat bodies share besides :class:`Sampling`: ``raw`` (send the prompt
    as it is instead of through the adapter's prompt format)."""

    raw: bool = Field(False, validate_default=True)

    @field_validator("raw", mode="before")
    @classmethod
    def _raw(cls, value: Any) -> bool:
        return _flag("raw", value)


class CompletionRequest(_Asking):
    """``POST /v1/completions``: ``prompt`` (a string, or a list of one), and ``raw``."""

    prompt: str = Field(None, validate_default=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("'prompt' must be a string (or a list of one string)")
        return value


class ChatRequest(_Asking):
    """``POST /v1/chat/completions``: ``messages`` with roles system/user/assistant, contents as
    text (a list of text parts is joined)."""

    messages: list[dict[str, str]] = Field(None, validate_default=True)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> list[dict[str, str]]:
        if not isinstance(value, list) or not value:
            raise ValueError('\'messages\' must be a non-empty list of {"role", "content"} objects')
        out = []
        for i, m in enumerate(value):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
                ):
                    raise ValueError(f"messages[{i}].content: only text parts are understood")
                content = "".join(p["text"] for p in content)
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
                raise ValueError(f'messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}')
            out.append({"role": m["role"], "content": content})
        return out


def parse_classify(data: dict[str, Any], limits: Limits, only: str | None = None) -> ClassifyRequest:
    """A ``/v1/classify`` body; without an ``adapter``, ``only`` (the one adapter served, if any)."""
    return _check(ClassifyRequest, data, limits, only=only)


def parse_sampling(data: dict[str, Any], limits: Limits, default_tokens: int) -> Sampling:
    """The sampling options of a completion or chat body."""
    return _check(Sampling, data, limits, default_tokens=default_tokens)


def parse_completion(data: dict[str, Any], limits: Limits) -> CompletionRequest:
    return _check(CompletionRequest, data, limits)


def parse_chat(data: dict[str, Any], limits: Limits) -> ChatRequest:
    return _check(ChatRequest, data, limits)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> list[int]:
    """The token ids that ask for the assistant's next turn: the tokenizer's chat template
    (the adapter's system prompt first where the messages have none), else the turns as
    ``role: content`` lines."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def completion(
    kind: str,
    model: str,
    text: str,
    finish: str | None,
    usage: dict[str, int] | None = None,
    ident: str | None = None,
    chunk: bool = False,
    first: bool = False,
) -> dict[str, Any]:
    """One answer (or, with ``chunk``, one streamed piece) of a completion or chat request."""
    if kind == "chat":
        if chunk:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta if (text or first) else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": ident or new_id(kind), "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(key: str, value: Any, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"'{key}' must be a number from {low:g} to {high:g}")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'{key}' must be true or false")
    return value
