"""Preference data: rows of one prompt with a preferred and a dispreferred answer (or KTO's
single answers marked desirable or not), checked, tokenized as TRL 1.x tokenizes them, and
batched.

Layouts, chosen from the columns of a split:

* paired: ``prompt``, ``chosen``, ``rejected`` (``data.chosen_column``, ``data.rejected_column``);
* unpaired (KTO): ``prompt``, ``completion``, ``label`` (true for a desirable answer).

Each row is plain text (strings) or conversational: ``prompt`` a list of ``{role, content}``
messages ending on a user turn, each answer a list of assistant messages. Conversational rows
go through the tokenizer's chat template; plain rows are plain text, the answer followed by
EOS. The answer's tokens are where the tokenized prompt and the tokenized prompt-with-answer
part (TRL's rule: a template may render the prompt alone differently), so log-probabilities
sum over exactly the tokens TRL sums over. A pair longer than ``data.max_length`` keeps its
start; a prompt that fills ``max_length`` alone leaves no answer to score, and its row is
dropped. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .causal import ROLES, Rows
from .config import DataConfig
from .errors import PeftkitError


def to_pair_rows(table: Any, cfg: DataConfig, source: str, split: str) -> Rows:
    """A loaded table as :class:`~peftkit.causal.Rows` of kind ``paired`` or ``unpaired``."""
    from .data import column_lists

    columns = list(table.column_names) if hasattr(table, "column_names") else list(table)
    paired = {"chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    unpaired = {"completion": cfg.completion_column, "label": cfg.label_column}
    if all(c in columns for c in paired.values()):
        kind, cols = "paired", paired
    elif all(c in columns for c in unpaired.values()):
        kind, cols = "unpaired", unpaired
    else:
        raise PeftkitError(
            f"no preference columns in the {split} split (found: {', '.join(columns)})",
            source,
            f"give {cfg.prompt_column}, {cfg.chosen_column} and {cfg.rejected_column} columns (or, for KTO, "
            f"{cfg.prompt_column}, {cfg.completion_column} and a true/false {cfg.label_column}); "
            "data.chosen_column and data.rejected_column rename them",
        )
    if cfg.prompt_column in columns:
        cols = {"prompt": cfg.prompt_column, **cols}
    lists = column_lists(table, list(cols.values()))
    data = {key: lists[col] for key, col in cols.items()}
    rows = [dict(zip(data, values)) for values in zip(*data.values())]
    return Rows(rows, kind)


def check_layout(loss: str, kinds: set[str], where: str) -> None:
    """Refuse rows of the other layout for ``loss`` (KTO takes single answers, the rest pairs),
    before any row is tokenized."""
    want = {"unpaired"} if loss == "kto" else {"paired"}
    if kinds != want:
        columns = "prompt, completion and label" if loss == "kto" else "prompt, chosen and rejected"
        raise PeftkitError(
            f"preference loss {loss} takes rows of {columns}",
            where,
            "use loss kto for single answers marked true/false, another loss for pairs",
        )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(messages: Any, what: str, where: str, last: tuple[str, ...], only: str | None = None) -> None:
    if not isinstance(messages, list) or not messages:
        raise PeftkitError(f"the {what} is an empty message list", where, "give at least one {role, content} message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PeftkitError(
                f"the {what} holds a message that is not {{role, content}} with role {'/'.join(ROLES)}",
                where,
                "write each message as {'role': ..., 'content': '...'}",
            )
        if only and m["role"] != only:
            raise PeftkitError(
                f"the {what} holds a {m['role']} message", where, f"give the answer as {only} messages only"
            )
    if messages[-1]["role"] not in last:
        raise PeftkitError(
            f"the {what} ends on a {messages[-1]['role']} message, not {' or '.join(last)}",
            where,
            "end the prompt on the user's turn; the answers are the assistant's",
        )


def _text_of(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in value)
    return value if isinstance(value, str) else ""


@dataclass
class PairsEncoded:
    """One split's tokenized rows and what truncation did."""

    features: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0  # rows whose prompt plus answer went over max_length (cut at the end)
    dropped: int = 0  # rows whose prompt alone filled max_length (left out)
    kept: list[int] = field(default_factory=list)  # the source rows the features are, in order


class PairEncoder:
    """Checks and tokenizes preference rows with one tokenizer and data config."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tok, self.cfg = tokenizer, cfg

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []

    def _template_ids(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise PeftkitError(
                "conversational rows need a chat template, and the tokenizer has none",
                where,
                "give plain-text prompt and answers, or use a model with a chat template",
            )
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    def check(self, row: dict[str, Any], kind: str, where: str) -> None:
        """Raise the one-line error for a row that cannot be scored."""
        answers = ("chosen", "rejected") if kind == "paired" else ("completion",)
        for key in ("prompt", *answers):
            if row.get(key) is None and not (key == "prompt" and "prompt" not in row):
                raise PeftkitError(f"the row has no {key}", where, f"give every row a {key}")
        chat = [key for key in ("prompt", *answers) if _is_messages(row.get(key))]
        if chat and len(chat) != len([k for k in ("prompt", *answers) if k in row]):
            raise PeftkitError(
                "the row mixes message lists and plain text",
                where,
                "give prompt and answers all as message lists, or all as text",
            )
        if chat:
            if "prompt" in row:
                _check_messages(row["prompt"], "prompt", where, ("user", "system"))
            for key in answers:
                _check_messages(row[key], key, where, ("assistant",), only="assistant")
        for key in answers:
            if not isinstance(row[key], (str, list)) or not _text_of(row[key]).strip():
                raise PeftkitError(f"the {key} answer is empty", where, "give every row a non-empty answer")
        if "prompt" in row and not chat and not isinstance(row["prompt"], str):
            raise PeftkitError("the prompt is not text", where, "give the prompt as text or as a message list")
        if kind == "paired" and row["chosen"] == row["rejected"]:
            raise PeftkitError("chosen and rejected are the same answer", where, "remove the row, or fix its answers")
        if kind == "unpaired" and not (isinstance(row["label"], bool) or row["label"] in (0, 1)):
            raise PeftkitError(
                f"label {row['label']!r} is not true or false", where, "mark desirable answers true, others false"
            )

    def split_ids(self, prompt: Any, answers: list[Any], where: str) -> tuple[list[int], list[list[int]]]:
        """The prompt's ids and each answer's, as TRL cuts them (the answers share the prompt's ids)."""
        if _is_messages(answers[0]):
            messages = self._system() + list(prompt or [])
            head = self._template_ids(messages, True, where)
            fulls = [self._template_ids(messages + list(a), False, where) for a in answers]
        else:
            text = prompt or ""
            eos = self.tok.eos_token
            head = list(self.tok(text)["input_ids"])
            ends = [a if not eos or a.endswith(eos) else a + eos for a in answers]
            fulls = [list(self.tok(text + a)["input_ids"]) for a in ends]
        cut = min(_common_prefix(head, f) for f in fulls)
        return head[:cut], [f[cut:] for f in fulls]

    def encode_split(self, rows: Rows, where: str, kl_group: int = 0) -> PairsEncoded:
        """Every row checked and tokenized; ``kl_group`` (unpaired rows) pairs each prompt with the
        previous row's answer within consecutive groups of that many rows (TRL's KL estimate)."""
        out = PairsEncoded()
        limit = self.cfg.max_length
        answers = ("chosen", "rejected") if rows.kind == "paired" else ("completion",)
        for i, row in enumerate(rows.rows):
            at = f"{where}, row {i + 1}"
            self.check(row, rows.kind, at)
            prompt, ids = self.split_ids(row.get("prompt"), [row[k] for k in answers], at)
            if len(prompt) >= limit:
                out.dropped += 1
                continue
            room = limit - len(prompt)
            out.truncated += any(len(a) > room for a in ids)
            feature: dict[str, Any] = {"prompt": prompt, **{k: a[:room] for k, a in zip(answers, ids)}}
            if rows.kind == "unpaired":
                feature["label"] = bool(row["label"])
            feature["input_ids"] = prompt + max((feature[k] for k in answers), key=len)
            out.features.append(feature)
            out.kept.append(i)
        if rows.kind == "unpaired" and kl_group:
            feats = out.features
            for start in range(0, len(feats), kl_group):
                group = feats[start : start + kl_group]
                for j, feature in enumerate(group):
                    other = group[j - 1]["completion"]
                    feature["kl_completion"] = other[: limit - len(feature["prompt"])]
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pad_rows(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def sequences(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt-plus-answer rows, right-padded: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` (1 on the answer's tokens)."""
    ids = [p + a for p, a in zip(prompts, answers)]
    return {
        "input_ids": pad_rows(ids, pad_id),
        "attention_mask": pad_rows([[1] * len(s) for s in ids], 0),
        "completion_mask": pad_rows([[0] * len(p) + [1] * len(a) for p, a in zip(prompts, answers)], 0),
    }


def collate_pairs(features: list[dict[str, Any]], pad_id: int, indices: list[int]) -> dict[str, torch.Tensor]:
    """A batch of pairs: the chosen rows first, then the rejected ones (``2 x len(features)`` rows);
    ``index`` holds the pairs' positions in their split."""
    prompts = [f["prompt"] for f in features]
    batch = sequences(prompts + prompts, [f["chosen"] for f in features] + [f["rejected"] for f in features], pad_id)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


def collate_unpaired(features: list[dict[str, Any]], pad_id: int, indices: list[int]) -> dict[str, torch.Tensor]:
    """A batch of KTO rows, and their KL rows (each prompt with another row's answer) as ``kl_*``."""
    prompts = [f["prompt"] for f in features]
    batch = sequences(prompts, [f["completion"] for f in features], pad_id)
    if "kl_completion" in features[0]:
        kl = sequences(prompts, [f["kl_completion"] for f in features], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["label"] = torch.tensor([f["label"] for f in features], dtype=torch.bool)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    return batch
