"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``output_dir/checkpoints/step-00000123/`` holding the trainable
tensors, the best-so-far tensors, optimizer, scheduler and gradient-scaler state, every
process's RNG states (Python, NumPy, torch), the loop position (epoch, batch, logging
window), the metrics history so far, and the run's config. It is
written under a temporary name and renamed into place, so a folder with the final name is
always complete; temporaries left by a killed process are removed when the run resumes.

Nothing in a checkpoint is a pickle: tensors are safetensors files and everything else is JSON
(``state.json`` holds the optimizer, scheduler, scaler and RNG states with each tensor replaced
by a reference into ``state.safetensors``). Loading one never runs code from the folder, so a
checkpoint someone handed you is as safe to resume as your own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PeftkitError
from .fsio import atomic_dir

CHECKPOINTS = "checkpoints"
NAME = re.compile(r"^step-(\d{8})$")
STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"


def encode_tree(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nest of dicts, lists, tuples, numbers, strings, tensors and numpy arrays as JSON-ready
    data plus the tensors it refers to (``{"__tensor__": key}``); :func:`decode_tree` inverts it.
    Tuples, numpy arrays and dicts with non-string keys (optimizer states by parameter index)
    are tagged so they come back as they were."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[int, str] = {}  # id(tensor) -> its key: one tensor met twice is stored once
    storages: set[int] = set()

    def enc(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) in keys:  # bitsandbytes' 8-bit states share their quantisation maps
                return {"__tensor__": keys[id(v)]}
            key = keys[id(v)] = str(len(tensors))
            t = v.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in storages:  # another view of stored memory: safetensors
                t = t.clone()  # refuses shared storage, so a copy
            storages.add(t.untyped_storage().data_ptr())
            tensors[key] = t
            return {"__tensor__": key}
        if isinstance(v, np.ndarray):
            return {
                "__ndarray__": enc(torch.from_numpy(np.ascontiguousarray(v).astype(np.int64)))
                if v.dtype.kind in "iu"
                else enc(torch.from_numpy(np.ascontiguousarray(v))),
                "dtype": v.dtype.str,
            }
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x) for k, x in v.items()}
            return {"__items__": [[enc(k), enc(x)] for k, x in v.items()]}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"cannot store a {type(v).__name__} in a checkpoint")

    return enc(value), tensors


def decode_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`encode_tree` encoded."""

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return tensors[v["__tensor__"]]
        if "__ndarray__" in v:
            return dec(v["__ndarray__"]).numpy().astype(np.dtype(v["dtype"]))
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__items__" in v:
            return {dec(k): dec(x) for k, x in v["__items__"]}
        return {k: dec(x) for k, x in v.items()}

    return dec(tree)


def stop_for_test(point: str, step: int) -> None:
    """Deterministic kill points for the resume tests: ``PEFTKIT_TEST_STOP=point:N`` sends this
    process SIGKILL (``step``: once optimizer step N is done; ``checkpoint``: halfway through
    writing checkpoint N) or SIGTERM (``term``: once step N is done); with
    ``PEFTKIT_TEST_STOP_RANK=R`` only the process of global rank R does. Unset, it does nothing."""
    kind, _, at = os.environ.get("PEFTKIT_TEST_STOP", "").partition(":")
    if at != str(step):
        return
    rank = os.environ.get("PEFTKIT_TEST_STOP_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if point == "checkpoint" and kind == "checkpoint" or point == "step" and kind == "step":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == "step" and kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    out: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    rngs: list[dict[str, Any]],
    loop: dict[str, Any],
    metrics: str,
    config: str,
    keep: int,
    best_step: int | None,
    method: Any = None,
    task: Any = None,
) -> Path:
    """Write the checkpoint for ``step`` atomically, then prune old ones (keeping the best).

    Raises:
        PeftkitError: the folder cannot be written (disk full, permissions); the previous
            checkpoints are left as they were.
    """
    from safetensors.torch import save_file

    target = out / CHECKPOINTS / f"step-{step:08d}"
    try:
        with atomic_dir(target) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
            )
            stop_for_test("checkpoint", step)
            if best:
                save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rngs": rngs,
                "method": method,  # a method's own training state (AdaLoRA's importance scores)
                "task": task,  # a task's own (GRPO's rollouts waiting for their next update)
            }
            tree, tensors = encode_tree(state)
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(tree))
            (tmp / "metrics.jsonl").write_text(metrics)  # the history up to this step
            (tmp / "config.yaml").write_text(config)
            (tmp / "loop.json").write_text(json.dumps(loop, indent=1))
    except OSError as exc:
        raise PeftkitError(
            f"cannot write a checkpoint: {exc.strerror or exc}",
            str(target),
            "free disk space or make output_dir writable; earlier checkpoints are intact",
        ) from None
    prune(out, keep, best_step)
    return target


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)) and (p / "loop.json").is_file()
    ]
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
        raise PeftkitError(
            "not a complete checkpoint folder", str(path), "pass resume=auto or a checkpoints/step-* folder"
        )
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote, as tensors and plain values.

    Raises:
        PeftkitError: a file is missing or is not what a checkpoint holds (a pickle in place of
            the state, say): nothing from it is executed, and the run does not start.
    """
    from safetensors.torch import load_file

    fix = "resume from another checkpoint (resume=PATH), or start the run afresh in a new output_dir"
    if not (path / STATE_JSON).is_file():
        found = " (a state.pt pickle, which peftkit never unpickles)" if (path / "state.pt").exists() else ""
        raise PeftkitError(f"the checkpoint has no {STATE_JSON}{found}", str(path), fix)
    try:
        state = decode_tree(
            json.loads((path / STATE_JSON).read_text(encoding="utf-8")), load_file(str(path / STATE_TENSORS))
        )
        state["trainable"] = load_file(str(path / "trainable.safetensors"))
        state["best"] = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else {}
        state["loop"] = json.loads((path / "loop.json").read_text(encoding="utf-8"))
        state["metrics"] = (path / "metrics.jsonl").read_text(encoding="utf-8")
    except Exception as exc:  # a damaged or foreign file, whatever its kind: one line, nothing run
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PeftkitError(f"the checkpoint cannot be read ({type(exc).__name__}: {first})", str(path), fix) from None
    return state
