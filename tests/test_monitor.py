"""Monitoring: curves.png, peftkit plot, TensorBoard and offline wandb, plain progress lines."""

from __future__ import annotations

import json

import pytest

from peftkit import load_recipe
from peftkit.cli import main
from peftkit.train import train

from .conftest import has_module, tiny_recipe


@pytest.fixture(scope="module")
def two_runs(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    runs = []
    for name, lr in (("a", 0.02), ("b", 0.005)):
        recipe = tiny_recipe(
            tmp,
            tiny_bert_dir,
            sentiment_dir,
            **{"output_dir": str(tmp / name), "train.lr": lr, "train.epochs": 2, "train.eval_steps": 5},
        )
        train(load_recipe(recipe), echo=lambda _: None)
        runs.append(tmp / name)
    return runs


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_run_draws_curves(two_runs):
    for run in two_runs:
        assert png_size(run / "curves.png")[0] > 500


def test_plot_overlays_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, two_runs), "--output", str(out), "--metric", "f1"]) == 0
    assert png_size(out)[0] > 500
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.skipif(not (has_module("tensorboard") and has_module("wandb")), reason="tensorboard/wandb not installed")
def test_tensorboard_and_offline_wandb(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tiny_recipe(
        tmp_path, tiny_bert_dir, sentiment_dir, **{"train.epochs": 1, "train.report_to": ["tensorboard", "wandb"]}
    )
    train(load_recipe(recipe), echo=lambda _: None)
    run = tmp_path / "run"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "validation/loss", "validation/accuracy"} <= set(acc.Tags()["scalars"])
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].glob("*.wandb"))


def test_plain_progress_lines_when_not_a_terminal(tiny_bert_dir, sentiment_dir, tmp_path):
    from .conftest import run_cli

    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.epochs": 1, "train.log_steps": 5})
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "examples/s" in lines[0]  # 20 steps, a line every 5
    assert "\r" not in proc.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 20
