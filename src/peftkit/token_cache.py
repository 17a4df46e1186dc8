"""Tokenized splits cached on disk, so a rerun (or the next run of ``peftkit compare``) skips tokenizing.

An entry is named by a hash of everything the token ids depend on: the tokenizer (its whole
serialised definition, truncation side and class), ``max_length``, the texts (and pairs) in
order, and the ``tokenizers`` / ``transformers`` versions. A changed text, setting or
tokenizer is simply another entry; nothing is ever stale. Entries are ``.npz`` files (token
ids and token type ids as int32, per-example lengths; attention masks, all ones without
padding, are not stored) under ``tokens/`` in peftkit's cache folder (``$PEFTKIT_CACHE``, else
``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``), written under a temporary name and renamed. Only fast
(Rust-backed) tokenizers are cached: a slow one has no definition to hash.
Deleting the folder is always safe; ``data.token_cache: false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import fsio
from .fsio import atomic_path

FORMAT = "peftkit-tokens-1"  # part of every key: a new layout never reads an old file


def cache_dir() -> Path:
    """The ``tokens/`` folder of peftkit's cache (:func:`peftkit.fsio.cache_dir`)."""
    return fsio.cache_dir() / "tokens"


def cache_key(tokenizer: Any, texts: list[str], max_length: int, pairs: list[str] | None = None) -> str | None:
    """The entry name for this tokenization, or None when the tokenizer cannot be fingerprinted."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    h = hashlib.sha256()
    for part in (
        FORMAT,
        tokenizers.__version__,
        transformers.__version__,
        type(tokenizer).__name__,
        getattr(tokenizer, "truncation_side", "right"),
        str(max_length),
        backend.to_str(),
    ):
        h.update(part.encode("utf-8") + b"\0")
    for column in (texts, pairs or []):
        h.update(f"{len(column)}\0".encode())
        for text in column:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def read(key: str) -> list[dict[str, list[int]]] | None:
    """The cached features for ``key``, or None when absent or unreadable (a cache is never an error)."""
    try:
        with np.load(cache_dir() / f"{key}.npz") as f:
            lengths = f["lengths"].tolist()
            names = [str(k) for k in f["keys"]]
            columns = {k: f[k].tolist() for k in names if k != "attention_mask"}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if sum(lengths) != len(columns.get("input_ids", ())):
        return None
    features = []
    start = 0
    for n in lengths:
        feat = {k: [1] * n if k == "attention_mask" else columns[k][start : start + n] for k in names}
        features.append(feat)
        start += n
    return features


def write(key: str, features: list[dict[str, list[int]]]) -> None:
    """Store ``features`` under ``key``. Skipped when an attention mask is not all ones (the
    file does not hold masks) or the cache folder is not writable."""
    names = list(features[0]) if features else ["input_ids"]
    if "attention_mask" in names and not all(all(f["attention_mask"]) for f in features):
        return
    lengths = np.fromiter((len(f["input_ids"]) for f in features), dtype=np.int64, count=len(features))
    arrays = {"lengths": lengths, "keys": np.array(names)}
    for k in names:
        if k != "attention_mask":
            arrays[k] = np.fromiter((t for f in features for t in f[k]), dtype=np.int32, count=int(lengths.sum()))
    try:
        with atomic_path(cache_dir() / f"{key}.npz") as tmp, open(tmp, "wb") as out:
            np.savez(out, **arrays)
    except OSError:
        pass
