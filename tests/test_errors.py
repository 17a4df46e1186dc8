"""Every bad input named in the foundation issue, tried from the CLI: one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main

from .conftest import tiny_recipe, write_jsonl


def expect_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("peftkit: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    return err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lrr=1e-3"], "did you mean 'train.lr'"),
        (["method.r=0"], "method.r"),
        (["method.dropout=1.5"], "method.dropout"),
        (["train.lr=-0.1"], "train.lr"),
        (["method.target_modules=[q_proj]"], "query"),
        (["data.text_column=review"], "review"),
        (["data.label_column=stars"], "stars"),
    ],
)
def test_bad_recipe_values(overrides, needle, tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    expect_error(capsys, ["train", str(recipe), *overrides], needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty"),
        ('{"text": "a", "label": 1}\n{"text": oops}\n', "line 2 is not valid JSON (Expecting value at column 10)"),
        (
            '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "a film th',
            "line 3 ends before its JSON object does",
        ),
        ("".join(json.dumps({"text": f"t {i}", "label": "pos"}) + "\n" for i in range(30)), "only one label"),
    ],
)
def test_bad_data_files(content, needle, tiny_bert_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, data)
    expect_error(capsys, ["train", str(recipe)], needle)
    assert not (tmp_path / "run").exists()


def test_unreadable_recipe(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("train: {lr: [1,\n")
    expect_error(capsys, ["train", str(bad)], "not valid YAML")


def test_adapter_that_does_not_fit_the_base(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    from transformers import BertModel

    from .conftest import make_tokenizer, tiny_bert_config

    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.epochs": 1})
    assert main(["train", str(recipe)]) == 0
    wider = tmp_path / "wider"
    BertModel(tiny_bert_config(hidden_size=48, num_attention_heads=2)).save_pretrained(wider)
    make_tokenizer().save_pretrained(wider)
    write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    capsys.readouterr()
    expect_error(
        capsys,
        [
            "predict",
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--model",
            str(wider),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
        ],
        "shape",
    )
    assert not (tmp_path / "out.jsonl").exists()
    expect_error(
        capsys,
        [
            "predict",
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        "input file not found",
    )
    (tmp_path / "nofield.jsonl").write_text('{"review": "x"}\n')
    expect_error(
        capsys,
        [
            "predict",
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--input",
            str(tmp_path / "nofield.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        "no 'text' field",
    )
    expect_error(
        capsys,
        [
            "predict",
            "--adapter",
            str(tmp_path),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        "not an adapter folder",
    )


def test_a_cut_line_is_named_alike_by_train_and_predict(tmp_path, capsys, tiny_bert_dir):
    """One reader of JSON Lines for every command: the same line number and words."""
    cut = tmp_path / "data.jsonl"
    cut.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(41)) + '{"text": "cu')
    train_err = expect_error(capsys, ["train", str(tiny_recipe(tmp_path, tiny_bert_dir, cut))], "line 42 ends before")
    predict_err = expect_error(
        capsys, ["predict", "--adapter", str(tmp_path), "--input", str(cut), "--output", "-"], "line 42 ends before"
    )
    assert train_err == predict_err


def test_a_label_typo_is_refused_with_its_row(tiny_bert_dir, tmp_path, capsys):
    from .conftest import sentiment_rows

    rows = sentiment_rows(60, seed=4)
    rows[41]["label"] = "postive"
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    expect_error(
        capsys,
        ["train", str(tiny_recipe(tmp_path, tiny_bert_dir, data))],
        "label 'postive' appears on 1 row only (row 42) and looks like a typo of 'positive'",
    )
    assert not (tmp_path / "run").exists()
    # a rare label that resembles no other is data, not a typo
    rows[41]["label"] = "mixed"
    write_jsonl(tmp_path / "data.jsonl", rows)
    from peftkit.data import check_label_typos

    check_label_typos([r["label"] for r in rows], "data")


def test_a_typo_in_the_recipe_is_blamed_on_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  epoch: 3\n")
    err = expect_error(capsys, ["train", str(recipe), "method.r=8"], "unknown key 'train.epoch'")
    assert f"({recipe})" in err and "override" not in err


@pytest.mark.parametrize(
    "name, option",
    [
        ("dora", "method.use_dora=true"),
        ("pissa", "method.init_lora_weights=pissa"),
        ("olora", "method.init_lora_weights=olora"),
        ("rslora", "method.use_rslora=true"),
    ],
)
def test_lora_variants_named_as_methods_point_to_their_option(name, option, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 0\n")
    expect_error(capsys, ["train", str(recipe), f"method.name={name}"], f"use method.name=lora with {option}")


def test_a_system_prompt_without_a_chat_template_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: causal_lm\ndata: {system_prompt: Be brief., chat_template: false}\n")
    expect_error(capsys, ["train", str(recipe)], "set data.chat_template: true")
