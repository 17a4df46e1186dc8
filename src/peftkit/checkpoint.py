"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``output_dir/checkpoints/step-00000123/`` holding the trainable
tensors, the best-so-far tensors, optimizer, scheduler and gradient-scaler state, every
process's RNG states (Python, NumPy, torch), the loop position (epoch, batch, logging
window), the metrics history so far, and the run's config. It is
written under a temporary name and renamed into place, so a folder with the final name is
always complete; temporaries left by a killed process are removed when the run resumes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PeftkitError
from .fsio import atomic_dir

CHECKPOINTS = "checkpoints"
NAME = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out: Path, step: int, *, trainable: dict[str, torch.Tensor], best: dict[str, torch.Tensor],
                    optimizer: Any, scheduler: Any, scaler: Any, rngs: list[dict[str, Any]], loop: dict[str, Any],
                    metrics: str, config: str, keep: int, best_step: int | None) -> Path:
    """Write the checkpoint for ``step`` atomically, then prune old ones (keeping the best).

    Raises:
        PeftkitError: the folder cannot be written (disk full, permissions); the previous
            checkpoints are left as they were.
    """
    from safetensors.torch import save_file

    target = out / CHECKPOINTS / f"step-{step:08d}"
    try:
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
            if best:
                save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None, "rngs": rngs},
                       tmp / "state.pt")
            (tmp / "metrics.jsonl").write_text(metrics)  # the history up to this step
            (tmp / "config.yaml").write_text(config)
            (tmp / "loop.json").write_text(json.dumps(loop, indent=1))
    except OSError as exc:
        raise PeftkitError(f"cannot write a checkpoint: {exc.strerror or exc}", str(target),
                           "free disk space or make output_dir writable; earlier checkpoints are intact") from None
    prune(out, keep, best_step)
    return target


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)) and (p / "loop.json").is_file()]
    return sorted(found)


def prune(out: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest ``keep`` checkpoints and the one of the best evaluation."""
    found = list_checkpoints(out)
    for step, path in found[:-keep] if keep > 0 else found:
        if step != best_step:
            shutil.rmtree(path, ignore_errors=True)


def remove_temporaries(out: Path) -> None:
    folder = out / CHECKPOINTS
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def find_resume(out: Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint in ``out`` (None if there is none); else a path."""
    if resume == "auto":
        remove_temporaries(out)
        found = list_checkpoints(out)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "loop.json").is_file():
        raise PeftkitError("not a complete checkpoint folder", str(path), "pass resume=auto or a checkpoints/step-* folder")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote, as tensors and plain values."""
    from safetensors.torch import load_file

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)  # our own file
    state["trainable"] = load_file(str(path / "trainable.safetensors"))
    state["best"] = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else {}
    state["loop"] = json.loads((path / "loop.json").read_text())
    state["metrics"] = (path / "metrics.jsonl").read_text()
    return state
