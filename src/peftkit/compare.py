"""``peftkit compare``: several methods on the same model, data, seed and budget.

A comparison recipe is a training recipe plus a ``compare:`` mapping from a run name to
that run's changes (usually ``method`` and ``train.lr``). Every run is an ordinary
``peftkit train`` in its own process (so peak memory is each run's own), writing to
``<output_dir>/<run name>``; the comparison then reads each run's ``summary.json`` and writes
``comparison.md``, ``comparison.json`` and ``comparison.png`` to ``output_dir``.
A run whose ``summary.json`` exists for the same resolved config is reused, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, build_config, dump_config, parse_override
from .errors import PeftkitError
from .fsio import atomic_write_text, write_json


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if key == "method" or not isinstance(value, dict) or not isinstance(out.get(key), dict):
            out[key] = copy.deepcopy(value)  # a method block replaces the base's whole
        else:
            out[key] = _merge(out[key], value)
    return out


def load_comparison(
    path: str | Path, overrides: list[str] = (), only: list[str] | None = None
) -> tuple[Path, dict[str, RunConfig]]:
    """The comparison's output folder and each run's validated config, in recipe order.

    ``overrides`` (``key=value``) apply to every run, after the run's own changes.

    Raises:
        PeftkitError: no ``compare:`` block, an unknown run in ``only``, or any run's config invalid.
    """
    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftkitError("recipe not found", where, "pass a YAML file from recipes/") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PeftkitError(f"cannot read the recipe: {str(exc).splitlines()[0]}", where) from None
    if not isinstance(data, dict) or not isinstance(data.get("compare"), dict) or not data["compare"]:
        raise PeftkitError(
            "the recipe has no compare: block", where, "add compare: {run name: {method: {...}, train: {...}}, ...}"
        )
    runs_raw = data.pop("compare")
    names = list(runs_raw)
    if only:
        unknown = [n for n in only if n not in runs_raw]
        if unknown:
            raise PeftkitError(
                f"no run named {unknown[0]!r} in the comparison", where, f"choose from: {', '.join(names)}"
            )
        names = [n for n in names if n in only]

    def override(run: dict[str, Any]) -> dict[str, Any]:
        for text in overrides:
            keys, value = parse_override(text)
            node = run
            for part in keys[:-1]:
                node = node.setdefault(part, {})
            node[keys[-1]] = value
        return run

    out = Path(str(override(copy.deepcopy(data)).get("output_dir", "runs/compare")))
    configs = {}
    for name in names:
        change = runs_raw[name] or {}
        if not isinstance(change, dict):
            raise PeftkitError(f"compare.{name} must be a mapping of changes", where)
        run = override(_merge(data, change))
        run["output_dir"] = str(out / name)
        configs[name] = build_config(run, f"{where}, run {name}")
    return out, configs


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("overwrite", "resume")}


def _finished(cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of an earlier run of the same config, if there is one."""
    run = Path(cfg.output_dir)
    try:
        old = yaml.safe_load((run / "config.yaml").read_text())
        old = build_config(old).model_dump(mode="json")  # options added since then take their defaults
        if _comparable(old) != _comparable(cfg.model_dump(mode="json")):
            return None
        return json.loads((run / "summary.json").read_text())
    except (OSError, yaml.YAMLError, json.JSONDecodeError, PeftkitError, AttributeError):
        return None


def run_comparison(out: Path, configs: dict[str, RunConfig], echo=print) -> list[dict[str, Any]]:
    """Train every run (each in its own process) and write the comparison files.

    Returns one row per run; a failed run's row has ``error`` set and the others still run.
    """
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        summary = _finished(cfg)
        if summary is None:
            echo(f"== {name}: {cfg.method.label}, output in {cfg.output_dir}")
            recipe = out / f"{name}.recipe.yaml"
            atomic_write_text(recipe, dump_config(cfg.model_copy(update={"overwrite": True, "resume": None})))
            code = subprocess.call([sys.executable, "-m", "peftkit", "train", str(recipe)])
            if code in (130, 143):
                raise KeyboardInterrupt
            summary = _finished(cfg) if code == 0 else None
            if summary is None:
                rows.append({"run": name, "method": cfg.method.label, "error": f"training exited with code {code}"})
                write_report(out, rows)
                continue
        else:
            echo(f"== {name}: reusing the finished run in {cfg.output_dir}")
        rows.append(row_of(name, cfg, summary))
        write_report(out, rows)
    return rows


def row_of(name: str, cfg: RunConfig, summary: dict[str, Any]) -> dict[str, Any]:
    val, test = summary["validation"], summary.get("test") or {}
    return {
        "run": name,
        "method": cfg.method.label,
        "trainable_params": summary["trainable_params"],
        "trainable_percent": summary["trainable_percent"],
        "peak_rss_mb": round(summary.get("peak_rss_bytes", 0) / 2**20, 1),
        "train_seconds": summary["train_seconds"],
        "examples_per_s": summary.get("examples_per_s"),
        "val_accuracy": val["accuracy"],
        "val_f1": val["f1"],
        "test_accuracy": test.get("accuracy"),
        "test_f1": test.get("f1"),
        "lr": cfg.train.lr,
        "epochs": cfg.train.epochs,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | method | trainable params | % of total | peak RSS (MB) | train time (s) | examples/s "
        "| val acc | val F1 | test acc | test F1 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['method']} | {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['run']} | {r['method']} | {_fmt(r['trainable_params'])} | {r['trainable_percent']:.3f} "
            f"| {_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['train_seconds'], 1)} | {_fmt(r['examples_per_s'], 1)} "
            f"| {_fmt(r['val_accuracy'])} | {_fmt(r['val_f1'])} | {_fmt(r['test_accuracy'])} | {_fmt(r['test_f1'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict[str, Any]]) -> None:
    """comparison.md, comparison.json and comparison.png in ``out``."""
    from .plot import plot_comparison

    atomic_write_text(out / "comparison.md", markdown_table(rows))
    write_json(out / "comparison.json", rows)
    done = [r for r in rows if "error" not in r]
    if done:
        plot_comparison(done, out / "comparison.png")
