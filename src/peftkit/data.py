"""Data: load -> map columns and labels -> split -> tokenize -> length-grouped batches.

Sources: a packaged asset name (see :mod:`peftkit.assets`), a local file (csv, tsv, json,
jsonl, jsonl.gz, parquet), a local folder holding ``train.*``/``validation.*``/``test.*``
files, or a hub id (through ``datasets.load_dataset``).
"""

from __future__ import annotations

import bz2
import difflib
import gzip
import json
import lzma
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .assets import DATASET_LOADERS
from .config import DataConfig
from .errors import PeftkitError

SUFFIXES = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".json": open, ".jsonl": open}
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "train": ("train",), "test": ("test",)}


@dataclass
class Split:
    """One split as plain columns: texts, optional second texts, raw labels (names or ints)."""

    texts: list[str]
    labels: list[Any]
    pairs: list[str] | None = None
    label_names: list[str] | None = None  # names the source itself gives integer labels

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Split:
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Split(pick(self.texts), pick(self.labels), self.pairs and pick(self.pairs), self.label_names)


def _file_format(path: Path) -> tuple[str, dict]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in SUFFIXES:
        raise PeftkitError(
            f"unsupported data file type '{''.join(path.suffixes)}'",
            str(path),
            "use csv, tsv, json, jsonl, jsonl.gz or parquet",
        )
    return SUFFIXES[suffixes[-1]]


def _has_data_suffix(path: Path) -> bool:
    return any(s.lower() in SUFFIXES for s in path.suffixes)


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = path.name.split(".")[0].lower()
        for split, aliases in SPLIT_ALIASES.items():
            if stem in aliases and split not in found:
                found[split] = path
    return found


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors reach the user as ours


def _load_tables(source: str) -> dict[str, Any]:
    """``{split: datasets.Dataset or dict of columns}`` for any supported source."""
    if source in DATASET_LOADERS:
        return DATASET_LOADERS[source]()
    path = Path(source).expanduser()
    if path.is_file():
        files = {"train": path}
    elif path.is_dir() and not (path / "dataset_info.json").exists() and _split_files(path):
        files = _split_files(path)
    elif path.exists() or source.startswith((".", "/", "~")) or _has_data_suffix(path):
        if path.is_dir():
            raise PeftkitError(
                "no train/validation/test data files in this folder",
                source,
                "name files train.jsonl, validation.jsonl, test.jsonl (or csv/parquet)",
            )
        raise PeftkitError("dataset file not found", source, "check the path")
    else:
        return _load_hub(source)
    tables = {}
    for split, file in files.items():
        builder, kwargs = _file_format(file)
        if file.stat().st_size == 0:
            raise PeftkitError(f"the {split} data file is empty", str(file), "give a file with examples")
        table = read_json_lines(file) if builder == "json" else None
        if table is not None:
            tables[split] = table
            continue
        import datasets

        _quiet_datasets()
        try:
            tables[split] = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for malformed files
            while exc.__cause__ is not None:  # the innermost error says what is wrong
                exc = exc.__cause__
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise PeftkitError(
                f"cannot read {builder} data: {reason}", str(file), "check the file is well-formed"
            ) from None
    return tables


def read_json_lines(path: Path) -> dict[str, list] | None:
    """A JSON Lines file (one object per line; plain, gzip, bz2 or xz) as ``{column: values}``.

    Read with the standard library: going through ``datasets`` would add its large import
    tree to the process and write an Arrow copy of the file to its cache. A key missing
    from a row reads as None. Returns None for anything else (a JSON array or document, a
    malformed line, another compression); such files go through ``datasets``, which reads
    the other layouts and words the errors.
    """
    opener = OPENERS.get(path.suffix.lower())
    if opener is None:
        return None
    rows: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not rows:  # the first line decides the layout: an object opens JSON Lines
                    try:
                        first = json.loads(line)
                    except ValueError:
                        return None
                    if not isinstance(first, dict):
                        return None
                    rows.append(first)
                    continue
                rows.append(json_line(line, lineno, str(path)))
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"the file is not UTF-8 ({exc.reason})", str(path), "save it as UTF-8") from None
    except (OSError, EOFError, lzma.LZMAError):  # another compression, or a damaged archive
        return None
    if not rows:
        return None
    columns = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in columns}


def json_line(line: str, lineno: int, where: str) -> dict[str, Any]:
    """One line of a JSON Lines file as an object: the one reader (and message) of every command.

    Raises:
        PeftkitError: the line is not a JSON object (a cut line, a stray character), with its
            1-based number.
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        if "Unterminated" in exc.msg or exc.pos >= len(line.rstrip()):
            raise PeftkitError(
                f"line {lineno} ends before its JSON object does: it was cut short",
                where,
                "restore or remove that line",
            ) from None
        raise PeftkitError(
            f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
            where,
            "write one JSON object per line",
        ) from None
    if not isinstance(row, dict):
        raise PeftkitError(
            f"line {lineno} is a JSON {type(row).__name__}, not an object", where, "write one JSON object per line"
        ) from None
    return row


def _load_hub(name: str) -> dict[str, Any]:
    import datasets

    _quiet_datasets()
    try:
        return dict(datasets.load_dataset(name))
    except Exception as exc:
        raise PeftkitError(
            f"cannot load dataset '{name}': {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
            "dataset",
            "give a packaged name (rotten_tomatoes), a local file or folder, or a reachable hub id",
        ) from None


def _columns(table: Any) -> list[str]:
    return list(table.column_names) if hasattr(table, "column_names") else list(table)


def _to_split(table: Any, cfg: DataConfig, source: str, split: str) -> Split:
    columns = _columns(table)
    for key in ("text_column", "label_column", "text_pair_column"):
        col = getattr(cfg, key)
        if col is not None and col not in columns:
            raise PeftkitError(
                f"column '{col}' not found in the {split} split",
                source,
                f"set data.{key} to one of: {', '.join(columns)}",
            )
    names = None
    features = getattr(table, "features", None)
    if features is not None and hasattr(features.get(cfg.label_column), "names"):
        names = list(features[cfg.label_column].names)
    wanted = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c]
    cols = column_lists(table, wanted)
    texts = [str(t) if t is not None else "" for t in cols[cfg.text_column]]
    pairs = None
    if cfg.text_pair_column:
        pairs = [str(t) if t is not None else "" for t in cols[cfg.text_pair_column]]
    return Split(texts, cols[cfg.label_column], pairs, names)


def column_lists(table: Any, names: list[str]) -> dict[str, list]:
    """Columns as Python lists. A ``datasets.Dataset`` is converted in one go: indexing it by
    column and iterating formats one row at a time (6 s for SST-2's 67k rows)."""
    if hasattr(table, "select_columns"):
        return table.select_columns(list(dict.fromkeys(names))).to_dict()
    return {n: list(table[n]) for n in names}


def load_splits(source: str, cfg: DataConfig, seed: int, convert: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Load ``source`` into train / validation / (test) splits (:class:`Split`, or what ``convert``
    makes of them: :class:`~peftkit.causal.Rows` for causal LMs).

    A validation split is carved from train (``cfg.validation_fraction``, seeded) when the
    source has none. Subsampling (``max_*_samples``) is seeded too.

    Args:
        convert: ``(table, cfg, source, split_name) -> split`` (anything with ``len`` and
            ``subset``); default: text/label columns into a :class:`Split`.

    Raises:
        PeftkitError: missing files or columns, malformed files, empty splits.
    """
    convert = convert or _to_split
    tables = _load_tables(source)
    if cfg.train_split not in tables:
        raise PeftkitError(
            f"no '{cfg.train_split}' split", source, f"set data.train_split to one of: {', '.join(tables) or '(none)'}"
        )
    splits = {"train": convert(tables[cfg.train_split], cfg, source, cfg.train_split)}
    if cfg.validation_split and cfg.validation_split in tables:
        splits["validation"] = convert(tables[cfg.validation_split], cfg, source, cfg.validation_split)
    if cfg.test_split and cfg.test_split in tables:
        splits["test"] = convert(tables[cfg.test_split], cfg, source, cfg.test_split)
    if len(splits["train"]) == 0:
        raise PeftkitError("the training split is empty", source, "give a dataset with examples")
    if not cfg.label_names and getattr(splits["train"], "kind", "labelled") == "labelled":
        check_label_typos(splits["train"].labels, f"{source}, {cfg.train_split} split")
    rng = random.Random(seed)
    if "validation" not in splits:
        order = list(range(len(splits["train"])))
        rng.shuffle(order)
        n_val = max(1, round(len(order) * cfg.validation_fraction))
        if len(order) - n_val < 1:
            raise PeftkitError("too few examples to carve a validation split", source, "add examples")
        splits["validation"] = splits["train"].subset(sorted(order[:n_val]))
        splits["train"] = splits["train"].subset(sorted(order[n_val:]))
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    for name, limit in limits.items():
        if name in splits and limit:
            # evaluation splits by seed alone, so `peftkit eval --max-samples` picks the same rows
            splits[name] = subsample(splits[name], limit, rng if name == "train" else seed)
        if name in splits and len(splits[name]) == 0:
            raise PeftkitError(f"the {name} split is empty", source, "give a dataset with examples")
    return splits


def subsample(split: Any, limit: int | None, seed: int | random.Random) -> Any:
    """``limit`` rows of ``split`` drawn without replacement, in their original order; all of it
    when it is no longer. An int ``seed`` always draws the same rows from the same split."""
    if not limit or len(split) <= limit:
        return split
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return split.subset(sorted(rng.sample(range(len(split)), limit)))


def check_label_typos(labels: list[Any], where: str) -> None:
    """Refuse a label that is almost surely a misspelling of another: a string label on at most
    two rows (and at most 5% of the most common label's) whose name is close to a common label's.

    Raises:
        PeftkitError: naming the label, its rows (1-based, in the file's order) and the label it
            resembles.
    """
    counts = Counter(v for v in labels if isinstance(v, str))
    if len(counts) < 3:
        return
    top = counts.most_common(1)[0][1]
    common = [name for name, n in counts.items() if n > 2]
    for name, n in counts.items():
        if n > 2 or n > 0.05 * top:
            continue
        close = difflib.get_close_matches(name, common, n=1, cutoff=0.75)
        if close:
            rows = [i + 1 for i, v in enumerate(labels) if v == name]
            raise PeftkitError(
                f"label {name!r} appears on {n} row{'s' if n > 1 else ''} only (row "
                f"{', '.join(map(str, rows))}) and looks like a typo of {close[0]!r}",
                where,
                "correct those rows, or list every label in data.label_names to keep it",
            )


def infer_label_names(train: Split, given: list[str] | None) -> list[str]:
    """Label names in id order: given > the source's own names > sorted strings > 0..K-1.

    Raises:
        PeftkitError: fewer than two distinct labels.
    """
    values = set(train.labels)
    if given:
        names = list(given)
    elif train.label_names:
        names = list(train.label_names)
    elif all(isinstance(v, str) for v in values):
        names = sorted(values)
    elif all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        names = [str(i) for i in range(max(values) + 1)]
    else:
        raise PeftkitError(
            "labels must be all strings or all non-negative integers",
            "data.label_column",
            f"found values like {sorted(map(repr, values))[:5]}",
        )
    if len(values) < 2:
        raise PeftkitError(
            f"the training data has only one label ({next(iter(values))!r})",
            "data.label_column",
            "a classifier needs at least two labels",
        )
    return names


def encode_labels(split: Split, names: list[str], where: str) -> list[int]:
    """Raw labels -> ids in ``names``. Integers are ids already, strings are looked up."""
    index = {n: i for i, n in enumerate(names)}
    if split.label_names:  # the source's own integer -> name mapping
        raw = [split.label_names[v] if isinstance(v, int) else v for v in split.labels]
    else:
        raw = split.labels
    ids = []
    for value in raw:
        if isinstance(value, str):
            if value not in index:
                raise PeftkitError(
                    f"label {value!r} is not one of the model's labels {names}",
                    where,
                    "map the labels, or set data.label_names",
                )
            ids.append(index[value])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            ids.append(value)
        else:
            raise PeftkitError(
                f"label {value!r} is out of range for {len(names)} labels",
                where,
                "labels must be names or integers 0..K-1",
            )
    return ids


def tokenize(
    tokenizer: Any, texts: list[str], max_length: int, pairs: list[str] | None = None, cache: bool = False
) -> list[dict[str, list[int]]]:
    """Tokenize texts (truncated, unpadded) into one feature dict per example.

    With ``cache``, the result is read from / written to the on-disk token cache
    (:mod:`peftkit.token_cache`), keyed by the tokenizer, ``max_length`` and the texts.
    """
    from . import token_cache

    key = token_cache.cache_key(tokenizer, texts, max_length, pairs) if cache else None
    if key is not None:
        hit = token_cache.read(key)  # the key covers the number of texts too
        if hit is not None:
            return hit
    args = (texts, pairs) if pairs else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
    if key is not None:
        token_cache.write(key, features)
    return features


def collate(
    features: list[dict[str, list[int]]], pad_id: int, labels: list[int] | None = None, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (dynamic padding)."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for f in features:
            pad = [fill] * (width - len(f[key]))
            rows.append(pad + f[key] if padding_side == "left" else f[key] + pad)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


class LengthGroupedBatches:
    """Batches of similar length, in a random order that is fixed by (seed, epoch).

    Examples are shuffled, cut into chunks of ``batch_size * group`` examples, each chunk
    is sorted by length and cut into batches, and the batches are shuffled. Padding stays
    small while the order stays random. With several processes each one takes every
    ``num_processes``-th batch, and all take the same number.

    Args:
        lengths: tokens per example.
        batch_size: examples per batch.
        seed: base seed; the epoch is added, so each epoch has its own order.
        shuffle: False gives the examples sorted by length (evaluation).
        group_by_length: False gives plain shuffled batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        num_processes: int = 1,
        process_index: int = 0,
        group: int = 50,
    ):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.group_by_length, self.group = shuffle, group_by_length, group
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -self.lengths[i])
            return [order[i : i + bs] for i in range(0, n, bs)]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        if not self.group_by_length:
            return [order[i : i + bs] for i in range(0, n, bs)]
        batches = []
        chunk = bs * self.group
        for start in range(0, n, chunk):
            part = sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            batches += [part[i : i + bs] for i in range(0, len(part), bs)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.all_batches()
        if self.num_processes > 1:
            usable = len(batches) - len(batches) % self.num_processes if self.shuffle else len(batches)
            batches = batches[self.process_index : usable : self.num_processes]
        return iter(batches)

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)
        if self.num_processes > 1:
            return n // self.num_processes if self.shuffle else len(range(self.process_index, n, self.num_processes))
        return n


class RepeatedWindows:
    """The batches of ``batches`` (a sampler), each window of ``window`` consecutive batches given
    ``times`` times over before the next (GRPO's several updates per batch of generations)."""

    def __init__(self, batches: Any, window: int, times: int):
        self.batches, self.window, self.times = batches, window, times

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.batches)
        for start in range(0, len(order), self.window):
            for _ in range(self.times):
                yield from order[start : start + self.window]

    def __len__(self) -> int:
        return len(self.batches) * self.times


def load_one_split(source: str, split: str, cfg: DataConfig, convert: Callable[..., Any] | None = None) -> Split:
    """One named split of ``source``; a single-file source is its own only split.

    Raises:
        PeftkitError: the split does not exist, or columns are missing.
    """
    tables = _load_tables(source)
    if split not in tables:
        if len(tables) != 1:
            raise PeftkitError(f"no '{split}' split", source, f"use --split with one of: {', '.join(tables)}")
        split = next(iter(tables))
    result = (convert or _to_split)(tables[split], cfg, source, split)
    if len(result) == 0:
        raise PeftkitError(f"the {split} split is empty", source, "give a dataset with examples")
    return result
