"""What ``peftkit serve``'s requests may say: the JSON bodies of ``/v1/classify``,
``/v1/completions`` and ``/v1/chat/completions`` read into checked values, and the answers in
the shapes OpenAI's API gives (so its client libraries work unchanged). Every problem is an
:class:`~.serve_work.ApiError` whose message says what to send instead."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .serve_work import ApiError, Limits

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


def parse_classify(data: dict[str, Any], limits: Limits, only: str | None = None) -> tuple[Any, list[str]]:
    """The adapter name (checked by the store) and texts of a ``/v1/classify`` body; without an
    ``adapter``, ``only`` (the one adapter served, if there is one)."""
    adapter, texts = data.get("adapter", only), data.get("texts")
    if not isinstance(adapter, str):
        raise bad("'adapter' must be a string: the name of a loaded adapter (it may be left out when "
                  "the server has one)")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'texts' must be a non-empty list of strings")
    if len(texts) > limits.max_texts:
        raise bad(f"{len(texts)} texts in one request; at most {limits.max_texts}")
    return adapter, texts


@dataclass
class Sampling:
    """The generation options of a completion request."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool


def parse_sampling(data: dict[str, Any], limits: Limits, default_tokens: int) -> Sampling:
    """``model``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``stream`` (and ``n``,
    which may only be 1) of a completion or chat body."""
    model = data.get("model")
    if not isinstance(model, str):
        raise bad("'model' must be a string: an adapter name, or the base model's id (GET /v1/models)")
    tokens = data.get("max_tokens", data.get("max_completion_tokens"))
    tokens = default_tokens if tokens is None else tokens
    if not _is_int(tokens) or tokens < 1:
        raise bad("'max_tokens' must be a positive integer")
    if tokens > limits.max_tokens:
        raise bad(f"'max_tokens' is {tokens}; this server allows at most {limits.max_tokens}")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("'top_p' must be above 0 (at most 1)")
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a string or a list of at most 4 non-empty strings")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false")
    if data.get("n", 1) != 1:
        raise bad("'n' must be 1: ask once per answer")
    return Sampling(model, tokens, temperature, top_p, stop, stream)


def parse_prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or a list of one string)")
    return prompt


def parse_messages(data: dict[str, Any]) -> list[dict[str, str]]:
    """The chat ``messages``: roles system/user/assistant, contents as text (a list of text
    parts is joined)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are understood")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise bad(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
        out.append({"role": m["role"], "content": content})
    return out


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


def completion(kind: str, model: str, text: str, finish: str | None, usage: dict[str, int] | None = None,
               ident: str | None = None, chunk: bool = False, first: bool = False) -> dict[str, Any]:
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
    out = {"id": ident or new_id(kind), "object": obj, "created": int(time.time()), "model": model,
           "choices": [choice]}
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


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(f"'{key}' must be a number from {low:g} to {high:g}")
    return float(value)
