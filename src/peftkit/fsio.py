"""Writes that never leave a half-written file or folder behind.

Files and folders are written under a temporary name in the destination's own folder (same
filesystem), then renamed into place; on any error the temporary is removed. An output that
exists and is not a regular file (a symlink, a FIFO, ``/dev/stdout``) is written through instead:
a rename would replace it with a plain file. ``-`` stands for standard input or output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target``.

    An existing ``target`` is moved aside, the new folder renamed in, and the old one
    deleted, so at no moment does ``target`` hold a mix of old and new files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp's 0700 would hide the result from other users (a model server's)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


STDIO = "-"  # as an --input or --output: standard input or output


def replaceable(path: Path) -> bool:
    """Whether a write to ``path`` may be atomic (a temporary file renamed onto it): only for a
    regular file or a new path. A symlink, a FIFO, a device (``/dev/stdout``) or a socket is
    written through instead, since a rename would put a plain file in its place."""
    return not path.is_symlink() and (not path.exists() or path.is_file())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a path to write; on success it becomes ``path``.

    For a regular file (or a new one) that is a temporary file beside it, renamed onto it at the
    end; for anything else (:func:`replaceable`), the path itself, written through.
    """
    path = Path(path)
    if not replaceable(path):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (see :func:`atomic_path`);
    ``-`` writes it to standard output."""
    if str(path) == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def cache_dir() -> Path:
    """peftkit's one cache folder: ``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``, else
    ``~/.cache/peftkit``. Converted assets, tokenized splits (``tokens/``) and the native
    kernels live under it; deleting it is always safe."""
    root = os.environ.get("PEFTKIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftkit"
