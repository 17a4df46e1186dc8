"""The web page ``peftkit serve`` shows at ``/`` (one HTML file with its script, no build step),
and the training runs it lists with ``--runs``: each run's summary and curves, read from the
``summary.json`` and ``metrics.jsonl`` a ``peftkit train`` run writes, and the tables of
``peftkit compare``'s ``comparison.json``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PAGE = Path(__file__).with_name("page.html")
#: the summary fields the page shows (the rest, such as confusion matrices, stay on disk)
SUMMARY_KEYS = (
    "trainable_params",
    "trainable_percent",
    "best_step",
    "train_seconds",
    "examples_per_s",
    "validation",
    "test",
)


@lru_cache(maxsize=1)
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


def read_runs(folder: Path | None) -> dict[str, Any]:
    """The runs under ``folder`` (itself, its subfolders and theirs) and every comparison table
    found there; an unreadable file leaves its run out rather than failing the page."""
    if folder is None:
        return {"runs": [], "comparisons": []}
    runs, comparisons = [], []
    for path in sorted({folder, *folder.glob("*/"), *folder.glob("*/*/")}):
        if (path / "metrics.jsonl").is_file():
            run = _run(folder, path)
            if run is not None:
                runs.append(run)
        if (path / "comparison.json").is_file():
            try:
                rows = json.loads((path / "comparison.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            comparisons.append({"name": _name(folder, path), "rows": rows})
    return {"runs": runs, "comparisons": comparisons}


def run_of(folder: Path | None, adapter: Path | None) -> str | None:
    """The name :func:`read_runs` gives the training run that wrote ``adapter`` (its ``adapter/``
    folder), or None when that run is not under ``folder``."""
    if folder is None or adapter is None:
        return None
    run = Path(adapter).resolve().parent
    root = folder.resolve()
    if not (run / "metrics.jsonl").is_file() or (run != root and root not in run.parents):
        return None
    return _name(root, run)


def _run(folder: Path, path: Path) -> dict[str, Any] | None:
    try:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    except (OSError, json.JSONDecodeError):
        return None
    summary = {k: _lean(summary[k]) for k in SUMMARY_KEYS if k in summary}
    method = _config(path).get("method")
    if isinstance(method, dict) and isinstance(method.get("name"), str):
        summary["method"] = method["name"]
    train = [[r["step"], r["loss"]] for r in records if r.get("type") == "train" and "loss" in r]
    rewarded = [[r["step"], r["reward"]] for r in records if r.get("type") == "train" and "reward" in r]
    val = [
        {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for r in records
        if r.get("type") == "eval" and r.get("split") == "validation"
    ]
    return {
        "name": _name(folder, path),
        "summary": summary,
        "train": train,
        "train_reward": rewarded,
        "validation": val,
    }


def _config(path: Path) -> dict[str, Any]:
    """The run's config.yaml (empty where it is missing or unreadable)."""
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _lean(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "confusion_matrix"} if isinstance(value, dict) else value


def _name(folder: Path, path: Path) -> str:
    rel = path.relative_to(folder).as_posix()
    return folder.name if rel == "." else rel
