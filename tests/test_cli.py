"""End-to-end CLI runs on a tiny model built from a config: train, predict, eval, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftkit.cli import main
from peftkit.precision import native_bf16

from .conftest import run_cli, tiny_recipe, write_jsonl


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    """One real training run through the CLI, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = tiny_recipe(tmp, tiny_bert_dir, sentiment_dir)
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr
    return tmp / "run", proc.stdout


def test_train_writes_outputs_and_learns(trained):
    run, stdout = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation"]["accuracy"] >= 0.9
    assert summary["test"]["accuracy"] >= 0.9
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["train_seconds"] > 0
    assert summary["mixed_precision"] == ("bf16" if native_bf16() else "no")  # the recipe leaves it on auto
    assert {"accuracy", "loss", "f1"} <= set(summary["validation"])
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" for r in records)
    evals = [r for r in records if r["type"] == "eval" and r["split"] == "validation"]
    assert len(evals) == 4 and all("loss" in r for r in evals)  # one per epoch
    assert "test accuracy" in stdout and "peftkit predict --adapter" in stdout
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_predict_jsonl_and_plain_text(trained, tmp_path):
    run, _ = trained
    write_jsonl(tmp_path / "in.jsonl", [{"text": "the movie was great and fun"}, {"text": "a dull and boring film"}])
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(run / "adapter"),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    for r in rows:
        assert set(r["scores"]) == {"negative", "positive"}
        assert abs(sum(r["scores"].values()) - 1) < 1e-4
    (tmp_path / "in.txt").write_text("what a superb story\n\nterrible acting\n")
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(run / "adapter"),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "out2.jsonl"),
            ]
        )
        == 0
    )
    labels = [json.loads(x)["label"] for x in (tmp_path / "out2.jsonl").read_text().splitlines()]
    assert labels == ["positive", "negative"]


def test_eval_prints_and_writes(trained, sentiment_dir, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(run / "adapter"),
                "--data",
                str(sentiment_dir),
                "--split",
                "test",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion matrix" in printed
    result = json.loads(out.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    # the run evaluates in float32 even when it trains under bf16 autocast, as eval does
    assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)
    assert sum(map(sum, result["confusion_matrix"])) == result["n"] == 80
    assert {"f1", "loss"} <= set(result)


def test_merged_model_runs_in_pipeline_without_peftkit(trained, tmp_path):
    run, _ = trained
    texts = ["the film was wonderful", "awful and tedious plot", "a very moving story", "weak acting"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    # a second merge to the same folder is refused before anything is loaded or written
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(run / "adapter"),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "pred.jsonl"),
            ]
        )
        == 0
    )
    ours = [json.loads(x)["label"] for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        f"clf = pipeline('text-classification', model={str(tmp_path / 'merged')!r})\n"
        f"print(json.dumps([r['label'] for r in clf({texts!r})]))\n"
        "assert 'peftkit' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours


def test_refuses_non_empty_output_dir(trained, tiny_bert_dir, sentiment_dir, capsys):
    run, _ = trained
    recipe = run.parent / "recipe.yaml"
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: output_dir exists") and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_exit_code_and_one_line_from_a_real_process(tmp_path):
    proc = run_cli("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("peftkit: error: recipe not found") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    debug = run_cli("--debug", "train", str(tmp_path / "missing.yaml"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr
