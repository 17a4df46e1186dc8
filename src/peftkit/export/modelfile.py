"""Ollama's ``Modelfile`` for an exported GGUF model, its chat template translated.

Ollama writes prompts with Go templates, transformers with Jinja. A general translation is not
possible, but most chat templates wrap each message the same way: an opening that names the
role, the content, a closing shared by all roles; and a generation prompt that is the
assistant's opening. :func:`chat_wraps` finds those strings by rendering the Jinja template on
marked messages, checks that they rebuild the template's own rendering of a longer conversation,
and :func:`go_template` writes them as a Go template over ``.Messages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MARK = "\u2063{}\u2063"  # an invisible separator around sample contents, unlikely in a template
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatWraps:
    """The text around each message of a chat template."""

    opens: dict[str, str]  # role -> what precedes its content
    close: str  # what follows every message's content
    start: str  # what precedes the first message only (a BOS text, say)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """What the template renders for ``messages`` (the Go template does the same)."""
        text = self.start + "".join(self.opens[m["role"]] + m["content"] + self.close for m in messages)
        return text + (self.opens["assistant"] if generation_prompt else "")


def chat_wraps(tokenizer: Any) -> ChatWraps | None:
    """The template's wraps, or None when it does not wrap messages uniformly (then the
    Modelfile leaves the template to Ollama, which reads the GGUF's own)."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    marks = [_MARK.format(i) for i in range(3)]
    try:
        full = render([{"role": r, "content": m} for r, m in zip(ROLES, marks)])
        asked = render([{"role": r, "content": m} for r, m in zip(ROLES[:2], marks[:2])], prompt=True)
    except Exception:  # a template that refuses this conversation (e.g. no system role)
        return None
    pieces = _split(full, marks)
    if pieces is None:
        return None
    head, after_system, after_user, close = pieces
    if not (after_system.startswith(close) and after_user.startswith(close)):
        return None
    opens = {"user": after_system[len(close) :], "assistant": after_user[len(close) :]}
    start = ""
    opens["system"] = head
    bos = getattr(tokenizer, "bos_token", None)
    if bos and head.startswith(bos):  # a BOS text the template writes once; llama.cpp adds BOS itself
        start, opens["system"] = bos, head[len(bos) :]
    wraps = ChatWraps(opens, close, start)
    if not asked.endswith(opens["assistant"]) or not _rebuilds(wraps, render):
        return None
    return wraps


def _split(text: str, marks: list[str]) -> list[str] | None:
    pieces, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            return None
        before, rest = rest.split(mark)
        pieces.append(before)
    return pieces + [rest]


def _rebuilds(wraps: ChatWraps, render: Any) -> bool:
    """Whether the wraps give the template's own text on a longer conversation."""
    talk = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "How are you?"},
    ]
    try:
        return render(talk, True) == wraps.render(talk, True)
    except Exception:
        return False


def go_template(wraps: ChatWraps) -> str:
    """The wraps as an Ollama (Go) template over ``.Messages``."""

    def quoted(text: str) -> str:
        return text.replace("{{", '{{ "{{" }}')

    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{quoted(wraps.opens[role])}'
        for i, role in enumerate(ROLES)
    )
    return (
        f"{quoted(wraps.start)}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ .Content }}}}"
        f"{quoted(wraps.close)}{{{{ end }}}}{quoted(wraps.opens['assistant'])}"
    )


def modelfile(
    model: str, adapter: str | None, wraps: ChatWraps | None, stops: list[str], system: str | None, note: str
) -> str:
    """The Modelfile's text: ``FROM`` the model file, ``ADAPTER``, ``TEMPLATE``, ``PARAMETER stop``
    for each stop token, ``SYSTEM`` for the system prompt training used."""
    lines = [f"# {note}", f"FROM ./{model}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if wraps is not None:
        lines.append(f'TEMPLATE """{go_template(wraps)}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not one this export translates; Ollama reads the GGUF's")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
