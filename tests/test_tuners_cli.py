"""VeRA, LoHa, LoKr, AdaLoRA, P-tuning and LayerNorm tuning through the commands: train, predict, eval and merge on
the tiny classifier, a causal-LM run, AdaLoRA's exact resume, and the one-line refusals."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from peftkit import load_recipe
from peftkit.cli import main
from peftkit.train import train

from .conftest import tiny_recipe, write_jsonl
from .test_errors import expect_error
from .test_resume import assert_same_run, newest_step, recipe_for, start, stopped_at

TARGETS = ["query", "value", "dense"]
#: method block, learning rate
METHODS = {
    "vera": ({"name": "vera", "r": 16, "target_modules": TARGETS}, 0.05),
    "loha": ({"name": "loha", "r": 4, "alpha": 8, "target_modules": TARGETS}, 0.01),
    "lokr": ({"name": "lokr", "r": 4, "alpha": 8, "target_modules": TARGETS}, 0.01),
    # 320 examples / batch 16 = 20 steps an epoch; 4 epochs
    "adalora": (
        {
            "name": "adalora",
            "init_r": 6,
            "target_r": 3,
            "alpha": 12,
            "target_modules": TARGETS,
            "total_step": 80,
            "tinit": 10,
            "tfinal": 20,
            "deltaT": 5,
        },
        0.05,
    ),
    "ptuning": ({"name": "ptuning", "num_virtual_tokens": 4}, 0.01),
    "ln_tuning": ({"name": "ln_tuning"}, 0.05),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_train_predict_eval_and_merge(name, request, sentiment_dir, tmp_path):
    method, lr = METHODS[name]
    # virtual tokens and norm gains need the base whose [CLS] output already carries the signal (tuned_bert_dir)
    base = request.getfixturevalue("tuned_bert_dir" if name in ("ptuning", "ln_tuning") else "tiny_bert_dir")
    recipe = tiny_recipe(tmp_path, base, sentiment_dir, method=method, **{"train.lr": lr})
    summary = train(load_recipe(recipe), echo=lambda _: None)
    assert summary["test"]["accuracy"] >= 0.7, summary["test"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        config["peft_type"]
        == {
            "vera": "VERA",
            "loha": "LOHA",
            "lokr": "LOKR",
            "adalora": "ADALORA",
            "ptuning": "P_TUNING",
            "ln_tuning": "LN_TUNING",
        }[name]
    )
    if name == "adalora":  # pruned towards 3 of 6 ranks a layer (the best step may precede the last pruning)
        kept = config["rank_pattern"]
        assert 3 * len(kept) <= sum(map(sum, kept.values())) < 6 * len(kept)

    texts = ["what a superb story", "terrible acting", "a wonderful film"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(adapter),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "pred.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative", "positive"]
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(adapter),
                "--data",
                str(sentiment_dir),
                "--split",
                "test",
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    if name == "ptuning":
        return
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        probs = merged(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    for row, p in zip(rows, probs):
        assert max(abs(row["scores"][label] - p[i].item()) for i, label in enumerate(("negative", "positive"))) < 1e-4


@pytest.mark.parametrize("name", ["vera", "adalora"])
def test_causal_lm_runs_train_and_generate(name, tiny_llama_dir, sentiment_dir, tmp_path):
    from .test_causal import LM_PROMPT

    method = (
        {"name": "vera", "r": 8, "target_modules": "all-linear"}
        if name == "vera"
        else {
            "name": "adalora",
            "init_r": 4,
            "target_r": 2,
            "alpha": 8,
            "target_modules": "all-linear",
            "total_step": 40,
            "tinit": 4,
            "tfinal": 8,
            "deltaT": 4,
        }
    )
    recipe = tiny_recipe(
        tmp_path,
        tiny_llama_dir,
        sentiment_dir,
        task="causal_lm",
        method=method,
        **{"data.prompt_template": LM_PROMPT, "data.max_length": 48, "train.epochs": 2, "train.lr": 0.02},
    )
    summary = train(load_recipe(recipe), echo=lambda _: None)
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["type"] == "train"]
    assert losses[-1] < losses[0] and "perplexity" in summary["validation"]
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "boring film"}, {"text": "a wonderful story"}])
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(tmp_path / "run" / "adapter"),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    from peftkit.generation import generate
    from peftkit.multi import load_adapted_lm

    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    lm = load_adapted_lm(tmp_path / "run" / "adapter")
    want = generate(
        lm.model,
        lm.tokenizer,
        [lm.prompt_ids(t) for t in ("boring film", "a wonderful story")],
        max_new_tokens=2,
        stop_ids=lm.encoder.stop_ids,
    )
    assert [(r["line"], r["prompt"], r["answer"]) for r in got] == [
        (1, "boring film", want[0]),
        (2, "a wonderful story", want[1]),
    ]


def test_adalora_resume_after_sigkill_is_exact(tiny_bert_dir, sentiment_dir, tmp_path):
    """The importance scores and rank masks travel with checkpoints: a run killed in the pruning
    phase and resumed ends bitwise where the uninterrupted run does."""
    method = {
        "name": "adalora",
        "init_r": 4,
        "target_r": 2,
        "alpha": 8,
        "target_modules": ["query", "value"],
        "total_step": 40,
        "tinit": 4,
        "tfinal": 10,
        "deltaT": 3,
        "dropout": 0.1,
    }
    runs = {}
    for name in ("ref", "kill"):
        recipe = recipe_for(tmp_path, tiny_bert_dir, sentiment_dir, name)
        data = recipe.read_text().replace("name: lora", "name: adalora")
        import yaml

        parsed = yaml.safe_load(data)
        parsed["method"] = method
        recipe.write_text(yaml.safe_dump(parsed))
        runs[name] = (recipe, tmp_path / name)
    proc = start(runs["ref"][0])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    recipe, run = runs["kill"]
    killed = stopped_at(recipe, "step:18")  # inside the pruning phase (steps 5-29)
    assert killed.returncode == -signal.SIGKILL and newest_step(run) == 17, killed.stderr
    resumed = start(recipe, "resume=auto")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert_same_run(run, runs["ref"][1])


@pytest.mark.parametrize(
    ("method", "needle"),
    [
        ({"name": "vera", "use_dora": True}, "'method.use_dora' is a LoRA option; method vera does not take it"),
        ({"name": "adalora", "target_modules": ["query"]}, "AdaLoRA needs a step budget"),
        ({"name": "adalora", "total_step": 10, "tinit": 10}, "leave no pruning phase"),
        (
            {"name": "vera", "r": 64, "target_modules": ["query", "value"]},
            "larger than the smallest targeted dimension",
        ),
        ({"name": "loha", "r": 0}, "method.r"),
    ],
)
def test_bad_tuner_options_are_one_line_and_write_nothing(
    method, needle, tiny_bert_dir, sentiment_dir, tmp_path, capsys
):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, method=method)
    expect_error(capsys, ["train", str(recipe)], needle)
    assert not (tmp_path / "run").exists()


def test_loha_refuses_gpt2_conv1d_on_one_line(tmp_path):
    from peftkit import apply_method
    from peftkit.errors import PeftkitError
    from peftkit.methods import LoHaConfig

    from .test_lora_variants import build

    model, _ = build("gpt2")
    with pytest.raises(PeftkitError, match="not GPT-2's Conv1D"):
        apply_method(model, LoHaConfig(target_modules=["c_attn"]))
