"""Using a trained adapter: load it onto its base, classify texts, evaluate, merge, export."""

from __future__ import annotations

import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter_io import AdapterFiles, head_size, read_adapter
from .assets import resolve_model
from .causal import LMEncoder, to_rows
from .config import DataConfig
from .data import encode_labels, json_line, load_one_split, subsample, tokenize
from .errors import PeftkitError
from .evaluate import predict_probs
from .fsio import STDIO, atomic_dir
from .methods.registry import check_mergeable
from .quantize import DTYPES, dequantize_model
from .tasks import CausalLMTask, ClassificationTask

LINE = "_line"  # the key under which read_rows keeps each row's 1-based line number


@dataclass
class AdaptedClassifier:
    """One classification adapter of a base with named adapters (:func:`peftkit.multi.load_named`;
    :func:`peftkit.multi.load_adapted_classifier` loads one), ready for inference; the caller
    makes it the active one."""

    model: Any
    tokenizer: Any
    label_names: list[str]
    max_length: int
    adapter: AdapterFiles
    base_model: str
    adapters: Any = None  # the model's methods.named.NamedAdapters, which merges it
    name: str = ""  # its name among them

    def predict_proba(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64, labels: list[int] | None = None
    ) -> tuple[np.ndarray, float | None]:
        """``(len(texts), num_labels)`` class probabilities, and the mean loss given ``labels``."""
        features = tokenize(self.tokenizer, texts, self.max_length, pairs)
        return predict_probs(
            self.model, features, pad_id=self.tokenizer.pad_token_id, batch_size=batch_size, labels=labels
        )

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """Raw float32 logits ``(len(texts), num_labels)``, one forward pass."""
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        self.model.eval()
        return self.model(**batch).logits.float()


def label_names_of(files: AdapterFiles, state: dict[str, torch.Tensor], keep: list[str], base: str) -> list[str]:
    """A classification adapter's label names: from peftkit.json, else the base's config when
    its head has as many labels, else LABEL_0, LABEL_1, ..."""
    id2label = files.meta.get("id2label")
    if id2label:
        return [id2label[k] for k in sorted(id2label, key=int)]
    n = head_size(state, keep)
    if n is None:
        raise PeftkitError(
            "the adapter holds no classification head", str(files.path), "train with the head in modules_to_save"
        )
    from transformers import AutoConfig  # transformers loads with the model; a file with label names never needs it

    try:
        known = AutoConfig.from_pretrained(resolve_model(base)).id2label
    except Exception:
        known = {}
    if known and len(known) == n:
        return [known[i] for i in sorted(known)]
    return [f"LABEL_{i}" for i in range(n)]


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts from JSON Lines (``{"text": ...}`` per line) or plain text (one per line); see
    :func:`read_rows`."""
    return [str(r[field]) for r in read_rows(path, field)]


def read_rows(path: str | Path, field: str = "text") -> list[dict[str, Any]]:
    """Rows from JSON Lines (objects with a ``field``; other fields such as ``id`` and ``adapter``
    kept) or plain text (one row ``{field: line}`` per line).

    A file whose name ends in .jsonl/.json (optionally .gz) is JSON Lines; anything else
    is plain text. Blank lines are skipped.

    Raises:
        PeftkitError: missing or unreadable file, a JSON line without ``field``, no rows.
    """
    if str(path) == STDIO:
        return _parse_rows(sys.stdin, "standard input", field, json_lines=None)
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise PeftkitError("input file not found", str(path), "check the path (or pass - to read standard input)")
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = any(s in (".jsonl", ".json") for s in path.suffixes)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return _parse_rows(f, str(path), field, json_lines=is_json)
    except (OSError, EOFError) as exc:
        raise PeftkitError(f"cannot read the input: {exc}", str(path), "give a UTF-8 text or JSONL file") from None


def _parse_rows(lines: Any, where: str, field: str, json_lines: bool | None) -> list[dict[str, Any]]:
    """Rows from an open text stream; ``json_lines=None`` decides from the first non-blank line
    (an object: JSON Lines; anything else: plain text). Each row remembers its 1-based ``line``."""
    rows: list[dict[str, Any]] = []
    try:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if json_lines is None:
                json_lines = line.lstrip().startswith("{")
            row = _json_row(line, lineno, field, where) if json_lines else {field: line.rstrip("\r\n")}
            row[LINE] = lineno
            rows.append(row)
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"the input is not UTF-8 ({exc.reason})", where, "give a UTF-8 text or JSONL file") from None
    if not rows:
        raise PeftkitError("the input has no texts", where, "give at least one line")
    return rows


def _json_row(line: str, lineno: int, field: str, path: str) -> dict[str, Any]:
    record = json_line(line, lineno, path)
    if field not in record:
        raise PeftkitError(
            f"line {lineno} has no '{field}' field", str(path), f"give each line a '{field}' field, or use --text-field"
        ) from None
    return record


def check_merge_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse to replace a non-empty ``output`` unless ``overwrite``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise PeftkitError("output exists and is not empty", str(output), "choose another --output or pass --overwrite")
    return output


def merge_to_folder(
    clf: AdaptedClassifier,
    output: str | Path,
    overwrite: bool = False,
    check_texts: list[str] | None = None,
    dtype: str = "float32",
) -> MergeCheck:
    """Merge the adapter into the base and save a plain transformers model folder.

    A quantized base is dequantized first; the folder is written in ``dtype`` (float32 or
    bfloat16). It holds weights, config (with label names) and tokenizer, and loads with
    ``transformers.pipeline("text-classification", model=output)`` without peftkit.

    Returns:
        How far the logits of the merged model are from those of the model as loaded (quantized
        and unmerged, if so), on ``check_texts`` (:class:`MergeCheck`): the merge's fidelity.

    Raises:
        PeftkitError: ``output`` exists and is not empty (unless ``overwrite``); method cannot merge.
    """
    texts = check_texts or CHECK_TEXTS

    def label_names() -> None:
        clf.model.config.id2label = dict(enumerate(clf.label_names))
        clf.model.config.label2id = {n: i for i, n in enumerate(clf.label_names)}

    return _merge_and_save(clf, clf.tokenizer, lambda: clf.logits(texts), output, overwrite, dtype, label_names)


#: what a merge's fidelity is measured on when the caller gives nothing
CHECK_TEXTS = ["a quick check sentence", "another, somewhat longer, sentence to compare"]


def merge_lm_to_folder(
    lm: AdaptedLM,
    output: str | Path,
    overwrite: bool = False,
    check_texts: list[str] | None = None,
    dtype: str = "float32",
) -> MergeCheck:
    """Merge a causal-LM adapter into its base and save a plain ``...ForCausalLM`` folder: weights,
    config, tokenizer (with its chat template) and a generation config that stops where the
    adapter's training format stops, so ``transformers.pipeline("text-generation", model=output)``
    runs it without peftkit. A quantized base is dequantized first.

    Returns:
        How far the logits moved (:class:`MergeCheck`), on ``check_texts``.

    Raises:
        PeftkitError: ``output`` exists and is not empty (unless ``overwrite``); method cannot merge.
    """
    texts = check_texts or CHECK_TEXTS

    def generation() -> None:
        stops = lm.encoder.stop_ids
        lm.model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else list(stops)
        if lm.model.generation_config.pad_token_id is None:
            lm.model.generation_config.pad_token_id = lm.tokenizer.pad_token_id

    return _merge_and_save(lm, lm.tokenizer, lambda: lm_logits(lm, texts), output, overwrite, dtype, generation)


@torch.no_grad()
def lm_logits(lm: AdaptedLM, texts: list[str]) -> torch.Tensor:
    """Float32 logits ``(len(texts), length, vocab)`` of one padded forward pass."""
    lm.model.eval()
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return lm.model(**batch).logits.float()


def merge_view(view: AdaptedClassifier | AdaptedLM, logits: Any, dtype: str = "float32") -> MergeCheck:
    """Dequantize the base, merge the view's adapter and unload every peftkit module, cast to
    ``dtype``: ``view.model`` is a plain transformers model after. Returns the largest logit
    difference the merge made (``logits()`` before and after).

    Raises:
        PeftkitError: a method that cannot merge.
    """
    check_mergeable(view.adapter.method_config())
    before = logits()
    dequantize_model(view.model)
    view.adapters.merge_and_unload(view.name)
    view.model.to(DTYPES[dtype])
    after = logits()
    return MergeCheck(float((before - after).abs().max()), float(before.abs().max()))


def _merge_and_save(
    view: AdaptedClassifier | AdaptedLM,
    tokenizer: Any,
    logits: Any,
    output: str | Path,
    overwrite: bool,
    dtype: str,
    configure: Any,
) -> MergeCheck:
    """:func:`merge_view`, let ``configure()`` set the config, save the model and tokenizer
    atomically; the largest logit difference the merge made."""
    output = check_merge_output(output, overwrite)
    check = merge_view(view, logits, dtype)
    configure()
    with atomic_dir(output) as tmp:
        view.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return check


@dataclass(frozen=True)
class MergeCheck:
    """How far the merged model's logits moved from the model as loaded (adapter unmerged)."""

    diff: float  #: the largest absolute difference
    scale: float  #: the largest absolute logit, for a sense of size

    @property
    def large(self) -> bool:
        """More than 1% of the logits' scale: more than a float32 or bfloat16 merge moves them. It
        happens when the loaded base computed with int8 or 4-bit weights and activations, which the
        merged float model does not."""
        return self.diff > 0.01 * max(self.scale, 1.0)


def evaluate_adapter(
    clf: AdaptedClassifier,
    source: str,
    split: str = "test",
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and confusion matrix of ``clf`` on a dataset split.

    Columns default to the ones the adapter was trained with (``peftkit.json``).
    """
    meta = clf.adapter.meta
    cfg = DataConfig(
        text_column=text_column or meta.get("text_column") or "text",
        label_column=label_column or meta.get("label_column") or "label",
        text_pair_column=meta.get("text_pair_column") if not text_column else None,
    )
    data = load_one_split(source, split, cfg)
    data = subsample(data, max_samples, clf.adapter.meta.get("seed", 0))
    labels = encode_labels(data, clf.label_names, f"{source}, {split} split")
    features = tokenize(clf.tokenizer, data.texts, clf.max_length, data.pairs)
    task = ClassificationTask(clf.label_names, {split: features}, {split: labels}, clf.tokenizer.pad_token_id)
    metrics = task.evaluate(clf.model, split, batch_size, next(clf.model.parameters()).device)
    return {"dataset": source, "split": split, "label_names": clf.label_names, **metrics}


@dataclass
class AdaptedLM:
    """A causal LM with an adapter loaded, and the prompt format it was trained with."""

    model: Any
    tokenizer: Any
    encoder: Any  # causal.LMEncoder: the training's prompt template and chat template
    adapter: AdapterFiles
    base_model: str
    adapters: Any = None  # the model's methods.named.NamedAdapters, which merges it
    name: str = ""  # its name among them

    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """``text`` as the training saw a prompt: through its template (labelled data) and the
        chat template; ``raw`` sends it as it is."""
        return self.encoder.prompt_for(text, raw)


def lm_encoder(tokenizer: Any, files: AdapterFiles) -> Any:
    """The prompt format a causal-LM adapter was trained with (template, chat template, labels)."""
    meta = files.meta
    cfg = DataConfig(
        max_length=int(meta.get("max_length") or 1024),
        prompt_template=meta.get("prompt_template"),
        chat_template=meta.get("chat_template"),
        system_prompt=meta.get("system_prompt"),
    )
    return LMEncoder(tokenizer, cfg, meta.get("label_names"))


def is_causal_lm_adapter(adapter_dir: str | Path) -> bool:
    files = read_adapter(adapter_dir)
    return files.meta.get("task") == "causal_lm" or files.config.get("task_type") == "CAUSAL_LM"


def evaluate_lm_adapter(
    lm: AdaptedLM, source: str, split: str = "test", *, max_samples: int | None = None, batch_size: int = 32
) -> dict[str, Any]:
    """Loss and perplexity of a causal-LM adapter on a dataset split, in the format it was
    trained with; for labelled prompts also label-scoring accuracy, F1 and exact match."""
    meta = lm.adapter.meta
    cfg = lm.encoder.cfg.model_copy(
        update={"text_column": meta.get("text_column") or "text", "label_column": meta.get("label_column") or "label"}
    )
    rows = load_one_split(source, split, cfg, convert=to_rows)
    rows = subsample(rows, max_samples, lm.adapter.meta.get("seed", 0))
    names = lm.encoder.label_names if rows.kind == "labelled" else None
    classes = encode_labels(rows, names, f"{source}, {split} split") if names else None
    encoder = LMEncoder(lm.tokenizer, cfg, lm.encoder.label_names)
    encoded = encoder.encode_split(rows, f"{source}, {split} split", classes)
    task = CausalLMTask(encoder, {split: encoded.features}, {split: encoded}, lm.tokenizer.pad_token_id, lm.tokenizer)
    metrics = task.evaluate(lm.model, split, batch_size, next(lm.model.parameters()).device, final=True)
    labelled = {"label_names": names} if names else {}
    return {"dataset": source, "split": split, "n": len(rows), **labelled, **metrics}
