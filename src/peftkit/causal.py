"""Causal language modelling records: records into token sequences with a loss mask, and packing.

Record formats, the first that fits a split's columns:

* chat records (``data.messages_column``): lists of ``{role, content}``; loss on the
  assistant turns;
* labelled data with ``data.prompt_template``: the prompt is the template filled with the
  text, the completion is the label's name (classification phrased as generation);
* prompt/completion pairs: loss on the completion;
* plain text: loss on every token.

With a chat template (the tokenizer's; ``data.chat_template``) a prompt becomes a user turn
and its completion the assistant's reply. ``data.train_on_prompt`` puts loss on prompts too.

Truncation to ``data.max_length`` shortens the prompt first (a labelled prompt loses the
end of its text, any other prompt its beginning), so a completion stays whole whenever it
fits at all; examples that lose part of their completion are counted and reported.

What a decoder is evaluated on lives in :mod:`peftkit.evaluate`; generation in
:mod:`peftkit.generation`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import IGNORE_INDEX as IGNORE
from .config import DataConfig
from .errors import PeftkitError

ROLES = ("system", "user", "assistant")


@dataclass
class Rows:
    """One split's records for causal LM: dicts with the fields of their ``kind``."""

    rows: list[dict[str, Any]]
    kind: str  # chat | labelled | prompt_completion | text
    label_names: list[str] | None = None  # the source's own names for integer labels

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int]) -> Rows:
        return Rows([self.rows[i] for i in indices], self.kind, self.label_names)

    @property
    def labels(self) -> list[Any]:
        return [r["label"] for r in self.rows]


def to_rows(table: Any, cfg: DataConfig, source: str, split: str) -> Rows:
    """A loaded table as :class:`Rows`, its format chosen from its columns."""
    columns = list(table.column_names) if hasattr(table, "column_names") else list(table)

    def need(*keys: str) -> None:
        for key in keys:
            col = getattr(cfg, key)
            if col not in columns:
                raise PeftkitError(
                    f"column '{col}' not found in the {split} split",
                    source,
                    f"set data.{key} to one of: {', '.join(columns)}",
                )

    names = None
    if cfg.messages_column in columns:
        kind, cols = "chat", {"messages": cfg.messages_column}
    elif cfg.prompt_template is not None:
        need("text_column", "label_column")
        kind, cols = "labelled", {"text": cfg.text_column, "label": cfg.label_column}
        if cfg.text_pair_column:
            need("text_pair_column")
            cols["text_pair"] = cfg.text_pair_column
        features = getattr(table, "features", None)
        if features is not None and hasattr(features.get(cfg.label_column), "names"):
            names = list(features[cfg.label_column].names)
    elif cfg.prompt_column in columns or cfg.completion_column in columns:
        need("prompt_column", "completion_column")
        kind, cols = "prompt_completion", {"prompt": cfg.prompt_column, "completion": cfg.completion_column}
    elif cfg.text_column in columns:
        kind, cols = "text", {"text": cfg.text_column}
    else:
        raise PeftkitError(
            f"no causal_lm columns in the {split} split (found: {', '.join(columns)})",
            source,
            "give messages, prompt and completion, or text columns; for labelled data set data.prompt_template",
        )
    from .data import column_lists

    lists = column_lists(table, list(cols.values()))
    data = {key: lists[col] for key, col in cols.items()}
    rows = [dict(zip(data, values)) for values in zip(*data.values())]
    return Rows(rows, kind, names)


@dataclass
class Encoded:
    """Token ids and per-token labels of one split, and what truncation did."""

    features: list[dict[str, list[int]]]
    prompts: list[list[int]] = field(default_factory=list)  # labelled: the prompt's ids, for scoring
    classes: list[int] = field(default_factory=list)  # labelled: the label ids
    truncated: int = 0  # examples over max_length (their prompt shortened first)
    completion_cut: int = 0  # examples that lost part of their completion


class LMEncoder:
    """Renders records with one tokenizer and one data config."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, label_names: list[str] | None = None):
        self.tok, self.cfg, self.label_names = tokenizer, cfg, label_names
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if cfg.chat_template is None else cfg.chat_template
        if self.chat and not has_template:
            raise PeftkitError(
                "the tokenizer has no chat template",
                "data.chat_template",
                "set data.chat_template: false, or use a model that has one",
            )
        self.stop_ids = self._eos()
        if self.chat:  # a reply also ends at the template's end-of-turn token (the first special one after it)
            reply = self._chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
            ids = next((self._ids(text, False) for text, train in reply if train), [])[len(self._ids("ok", False)) :]
            special = set(tokenizer.all_special_ids)
            self.stop_ids += [t for t in ids if t in special and t not in self.stop_ids][:1]
        self.label_tokens: list[int] = []
        if label_names:
            firsts = [
                next(ids for ids, train in self._segments_labelled({"text": ""}, name) if train)[0]
                for name in label_names
            ]
            if len(set(firsts)) < len(firsts):
                raise PeftkitError(
                    f"label names {label_names} do not start with different tokens",
                    "data.label_names",
                    "name the labels so their first words differ",
                )
            self.label_tokens = firsts

    # ---- rendering: a record -> [(token ids, carries loss)] ----
    def _ids(self, text: str, first: bool) -> list[int]:
        return self.tok(text, add_special_tokens=first and not self.chat)["input_ids"]

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _chat(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """Text pieces of a conversation; the assistant turns carry the loss."""
        pieces, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply(messages[:i], generation_prompt=True) if i else ""
            upto = self._apply(messages[: i + 1])
            if not (before.startswith(done) and upto.startswith(before)):
                raise PeftkitError(
                    "the chat template does not render a conversation turn by turn",
                    "data.chat_template",
                    "set data.chat_template: false",
                )
            pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
        rest = self._apply(messages)[len(done) :]
        return pieces + ([(rest, False)] if rest else [])

    def _user_turn(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def _pair(self, prompt: str, completion: str) -> list[tuple[list[int], bool]]:
        if self.chat:
            pieces = self._chat(self._user_turn(prompt) + [{"role": "assistant", "content": completion}])
            return [(self._ids(text, False), train) for text, train in pieces if text]
        if prompt and not prompt[-1].isspace():
            completion = " " + completion
        return [(self._ids(prompt, True), False), (self._ids(completion, False) + self._eos(), True)]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def prompt_text(self, text: str, text_pair: str = "") -> str:
        """A labelled prompt: the template filled in."""
        return self.cfg.prompt_template.format(text=text, text_pair=text_pair)

    def _segments_labelled(self, row: dict[str, Any], label: str) -> list[tuple[list[int], bool]]:
        return self._pair(self.prompt_text(row["text"], row.get("text_pair") or ""), label)

    def prompt_for(self, text: str, raw: bool = False) -> list[int]:
        """``text`` as training presented a prompt, ending where the answer begins: filled into
        the prompt template (labelled data), then through the chat template. ``raw`` sends it as
        it is. ``peftkit generate`` and the server's completions both ask through here."""
        if raw:
            return self.tok(text)["input_ids"]
        return self.prompt_ids(self.prompt_text(text) if self.cfg.prompt_template else text)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids that ask ``prompt``, ending where the answer begins (for generation)."""
        if self.chat:
            return self._ids(self._apply(self._user_turn(prompt), generation_prompt=True), False)
        return self._ids(prompt, True)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending where the assistant's answer begins."""
        if not self.chat:
            raise PeftkitError(
                "the prompts are chat messages but the run renders no chat template",
                "data.chat_template",
                "use a model with a chat template, or give the prompts as text",
            )
        return self._ids(self._apply(messages, generation_prompt=True), False)

    def segments(self, row: dict[str, Any], kind: str, where: str) -> list[tuple[list[int], bool]]:
        if kind == "chat":
            messages = row["messages"]
            if not isinstance(messages, list) or not messages:
                raise PeftkitError("a chat record has no messages", where, "give a list of {role, content}")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    role = m.get("role") if isinstance(m, dict) else m
                    raise PeftkitError(
                        f"a chat message has role {role!r}",
                        where,
                        f"use roles {', '.join(ROLES)}, each with a text 'content'",
                    )
            if not self.chat:
                raise PeftkitError(
                    "chat records need a chat template",
                    "data.chat_template",
                    "remove data.chat_template: false, or use a model that has one",
                )
            return [(self._ids(text, False), train) for text, train in self._chat(messages) if text]
        if kind == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
                missing = "prompt" if not isinstance(prompt, str) else "completion"
                raise PeftkitError(
                    f"a record has no {missing}", where, "give every record a prompt and a non-empty completion"
                )
            return self._pair(prompt, completion)
        if kind == "labelled":
            return self._segments_labelled(row, self.label_names[row["label_id"]])
        text = row["text"]
        return [(self._ids(text if isinstance(text, str) else "", True) + self._eos(), True)]

    # ---- one record -> one example within max_length ----
    def encode(self, row: dict[str, Any], kind: str, where: str, stats: Encoded) -> dict[str, list[int]]:
        limit = self.cfg.max_length
        segs = self.segments(row, kind, where)
        excess = sum(len(ids) for ids, _ in segs) - limit
        stats.truncated += excess > 0
        if excess > 0 and kind == "labelled":
            segs = self._shorten_text(row, excess, where)
        elif excess > 0:  # drop the prompt's earliest tokens first
            trimmed = []
            for ids, train in segs:
                if not train and excess > 0:
                    cut = min(excess, len(ids))
                    ids, excess = ids[cut:], excess - cut
                trimmed.append((ids, train))
            segs = trimmed
        ids = [t for seg, _ in segs for t in seg]
        train = [flag for seg, flag in segs for _ in seg]
        if len(ids) > limit:
            stats.completion_cut += 1
            ids, train = ids[:limit], train[:limit]
        labels = [t if flag or self.cfg.train_on_prompt else IGNORE for t, flag in zip(ids, train)]
        return {"input_ids": ids, "labels": labels}

    def _shorten_text(self, row: dict[str, Any], excess: int, where: str) -> list[tuple[list[int], bool]]:
        """A labelled prompt over the limit: cut the end of its text until the example fits."""
        row = dict(row)
        for _ in range(6):
            words = self.tok(row["text"], add_special_tokens=False)["input_ids"]
            if not words:
                raise PeftkitError(
                    f"data.max_length {self.cfg.max_length} is shorter than the prompt template with its answer",
                    where,
                    "raise data.max_length, or shorten the template",
                )
            row["text"] = self.tok.decode(words[: max(0, len(words) - excess - 1)])
            segs = self._segments_labelled(row, self.label_names[row["label_id"]])
            excess = sum(len(ids) for ids, _ in segs) - self.cfg.max_length
            if excess <= 0:
                return segs
        return segs

    def encode_split(self, rows: Rows, where: str, classes: list[int] | None = None) -> Encoded:
        stats = Encoded([])
        for i, row in enumerate(rows.rows):
            if classes is not None:
                row = {**row, "label_id": classes[i]}
            feature = self.encode(row, rows.kind, f"{where}, record {i}", stats)
            stats.features.append(feature)
            if classes is not None:
                first = next((j for j, t in enumerate(feature["labels"]) if t != IGNORE and j > 0), None)
                stats.prompts.append(
                    feature["input_ids"][:first] if not self.cfg.train_on_prompt else self._prompt_of(row)
                )
                stats.classes.append(classes[i])
        return stats

    def _prompt_of(self, row: dict[str, Any]) -> list[int]:
        segs = self._segments_labelled(row, self.label_names[row["label_id"]])
        ids = [t for seg, train in segs if not train for t in seg]
        return ids[-(self.cfg.max_length - 1) :]


def pack(features: list[dict[str, list[int]]], max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """Examples, in a seeded random order, concatenated into sequences of at most ``max_length``.

    Each sequence keeps its examples apart: ``segments`` numbers them (collate turns that into
    a block-diagonal causal mask), ``position_ids`` restart at 0 for each, and an example's
    first token is never a target (it would be predicted from the previous example).
    """
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "segments": []}
    for i in order:
        f = features[i]
        if current["input_ids"] and len(current["input_ids"]) + len(f["input_ids"]) > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": [], "segments": []}
        n = len(f["input_ids"])
        current["input_ids"] += f["input_ids"]
        current["labels"] += [IGNORE] + f["labels"][1:]
        current["position_ids"] += list(range(n))
        current["segments"] += [len(set(current["segments"]))] * n
    if current["input_ids"]:
        packed.append(current)
    return packed


def collate_lm(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels padded with -100. Packed examples get a 4-D mask that lets a
    token see only earlier tokens of its own example."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)

    batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE)}
    if "segments" not in features[0]:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features], dtype=torch.long
        )
        return batch
    seg = pad("segments", -1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves (no all-masked row)
    batch["attention_mask"] = mask[:, None]
    batch["position_ids"] = pad("position_ids", 0)
    return batch
