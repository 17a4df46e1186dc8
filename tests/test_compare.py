"""peftkit compare end to end on the tiny model, and the methods' bad options from the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit.cli import main

from .conftest import tiny_recipe
from .test_errors import expect_error


def comparison_recipe(tmp_path, model_dir, data_dir):
    base = yaml.safe_load(tiny_recipe(tmp_path, model_dir, data_dir).read_text())
    base.pop("method")
    base["output_dir"] = str(tmp_path / "cmp")
    base["train"]["max_steps"] = 6
    base["compare"] = {
        "lora": {"method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}},
        "bitfit": {"method": {"name": "bitfit"}},
        "prompt": {"method": {"name": "prompt", "num_virtual_tokens": 3, "init_text": "good bad"}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def test_compare_writes_a_complete_table_and_chart(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = comparison_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    assert main(["compare", str(recipe), "train.log_steps=100"]) == 0
    out = tmp_path / "cmp"
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["lora", "bitfit", "prompt"]
    keys = [
        "trainable_params",
        "trainable_percent",
        "peak_rss_mb",
        "train_seconds",
        "examples_per_s",
        "val_accuracy",
        "val_f1",
        "test_accuracy",
        "test_f1",
    ]
    for r in rows:
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in keys), r
        assert 0 < r["trainable_percent"] < 100
        assert (out / r["run"] / "adapter" / "adapter_config.json").is_file()
    assert rows[0]["trainable_params"] != rows[1]["trainable_params"]
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| run | method | trainable params")
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "comparison.md" in capsys.readouterr().out

    # a second call reuses the finished runs; --only picks some
    mtime = (out / "lora" / "summary.json").stat().st_mtime
    assert main(["compare", str(recipe), "--only", "lora", "train.log_steps=100"]) == 0
    assert (out / "lora" / "summary.json").stat().st_mtime == mtime
    assert "reusing" in capsys.readouterr().out


def test_compare_checks_every_run_before_training(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = comparison_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    data = yaml.safe_load(recipe.read_text())
    data["compare"]["bad"] = {"method": {"name": "adapter", "reduction_factor": 0}}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    expect_error(capsys, ["compare", str(recipe)], "method.reduction_factor")
    expect_error(capsys, ["compare", str(recipe), "--only", "nope"], "no run named 'nope'")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.name=prompt", "method.num_virtual_tokens=0"], "method.num_virtual_tokens"),
        (["method.name=adapter", "method.reduction_factor=100"], "larger than the hidden size 32"),
        (["method.name=prefix", "method.init=text"], "method.init"),
        (
            ["method.name=magic"],
            "choose one of: lora, vera, loha, lokr, adalora, adapter, prefix, prompt, ptuning, ia3, bitfit, full",
        ),
    ],
)
def test_bad_method_options_from_the_cli(overrides, needle, tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    expect_error(capsys, ["train", str(recipe), *overrides], needle)
    assert not (tmp_path / "run").exists()


def test_merge_refuses_methods_that_cannot_merge(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    assert main(["train", str(recipe), "method.name=adapter", "method.reduction_factor=4", "train.max_steps=2"]) == 0
    capsys.readouterr()
    expect_error(
        capsys,
        ["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output", str(tmp_path / "merged")],
        "adapter adapters cannot be merged",
    )
    assert not (tmp_path / "merged").exists()
    # and the adapter predicts as trained
    (tmp_path / "in.txt").write_text("a good movie\n")
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(tmp_path / "run" / "adapter"),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    from peftkit.multi import load_adapted_classifier

    row = json.loads((tmp_path / "p.jsonl").read_text())
    probs, _ = load_adapted_classifier(tmp_path / "run" / "adapter").predict_proba(["a good movie"])
    assert row["scores"] == pytest.approx(dict(zip(("negative", "positive"), probs[0].tolist())), abs=1e-6)
