"""The training loop's schedule: gradient accumulation, max_steps, overwrite, lr schedule."""

from __future__ import annotations

import json

import pytest

from peftkit import load_recipe
from peftkit.train import lr_lambda, train

from .conftest import tiny_recipe


def train_records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_and_max_steps(tiny_bert_dir, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    cfg = load_recipe(
        recipe,
        ["train.batch_size=8", "train.grad_accum=2", "train.max_steps=25", "train.eval_steps=10", "train.log_steps=1"],
    )
    summary = train(cfg, echo=lambda _: None)
    records = train_records(tmp_path / "run")
    steps = [r["step"] for r in records if r["type"] == "train"]
    # 320 examples / (8 x 2) = 20 optimizer steps an epoch; stopped at 25
    assert steps == list(range(1, 26))
    evals = [r for r in records if r["type"] == "eval" and r["split"] == "validation"]
    assert [e["step"] for e in evals] == [10, 20, 25]
    assert summary["best_step"] in (10, 20, 25) and summary["validation"]["accuracy"] >= 0.9


def test_overwrite_replaces_only_run_outputs(tiny_bert_dir, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.max_steps": 3})
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "summary.json").write_text("old")
    train(load_recipe(recipe, ["overwrite=true"]), echo=lambda _: None)
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "summary.json").read_text())["best_step"] == 3


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("linear", [0.5, 1.0, 0.5, 0.0]),
        ("cosine", [0.5, 1.0, 0.5, 0.0]),
        ("constant", [0.5, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule(kind, expected):
    f = lr_lambda(kind, warmup=1, total=3)
    assert [round(f(s), 6) for s in range(4)] == expected


def test_overfitting_is_detected_where_it_starts():
    from peftkit.train import overfitting_since as _overfitting_since

    # [step, validation loss, training loss]
    falling = [[10, 0.5, 0.6], [20, 0.4, 0.5], [30, 0.35, 0.4], [40, 0.33, 0.3]]
    assert _overfitting_since(falling) is None
    rising = falling + [[50, 0.36, 0.25], [60, 0.40, 0.2], [70, 0.45, 0.15]]
    assert _overfitting_since(rising) == 40
    both_rise = falling + [[50, 0.36, 0.35], [60, 0.40, 0.4], [70, 0.45, 0.5]]
    assert _overfitting_since(both_rise) is None  # training loss rose too: not overfitting


@pytest.mark.parametrize(
    "method",
    [
        ["method.name=prefix", "method.num_virtual_tokens=4", "train.lr=0.05"],
        ["method.name=prompt", "method.num_virtual_tokens=4", "method.init=vocab", "train.lr=0.05"],
    ],
)
def test_prefix_and_prompt_tuning_learn_on_a_bert_classifier(method, tuned_bert_dir, sentiment_dir, tmp_path):
    """Validation loss and accuracy of the trained run against the same setup untrained.

    The base is an encoder whose [CLS] output carries the signal (see ``tuned_bert_dir``),
    so a fresh random head may already separate the classes by luck: the loss must fall.
    """
    recipe = tiny_recipe(tmp_path, tuned_bert_dir, sentiment_dir)
    before = train(
        load_recipe(recipe, [*method, "train.max_steps=1", "train.lr=1e-9", f"output_dir={tmp_path / 'before'}"]),
        echo=lambda _: None,
    )
    after = train(load_recipe(recipe, [*method, "train.epochs=6"]), echo=lambda _: None)
    assert after["validation"]["accuracy"] >= 0.9
    assert after["validation"]["accuracy"] >= before["validation"]["accuracy"]
    assert after["validation"]["loss"] <= 0.5 * before["validation"]["loss"]
