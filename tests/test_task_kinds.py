"""Every kind of training data, end to end through ``peftkit train`` as a user runs it: one
process, and two under ``torchrun``, whose losses must equal the one-process run with the same
global batch. Each run must exit 0 and leave every output file a run promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LM_PROMPT, sentiment_rows, tiny_bert_config, tiny_recipe, write_jsonl

OUTPUTS = [
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/peftkit.json",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "config.yaml",
]


def _lm_rows(kind: str, n: int, seed: int) -> list[dict]:
    rows = []
    for r in sentiment_rows(n, seed):
        if kind == "text":
            rows.append({"text": r["text"]})
        elif kind == "chat":
            rows.append(
                {"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]}
            )
        else:
            rows.append({"prompt": r["text"], "completion": r["label"]})
    return rows


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, sentiment_dir) -> dict[str, Path]:
    """kind -> a folder with train/validation/test JSONL files of that record format."""
    root = tmp_path_factory.mktemp("kinds")
    out = {"labelled": sentiment_dir, "classification": sentiment_dir}
    for kind in ("text", "chat", "prompt_completion"):
        folder = root / kind
        folder.mkdir()
        for split, n, seed in (("train", 64, 1), ("validation", 16, 2), ("test", 16, 3)):
            write_jsonl(folder / f"{split}.jsonl", _lm_rows(kind, n, seed))
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory) -> Path:
    """The tiny BERT without dropout, so a run's losses depend on the batches alone."""
    import torch
    from transformers import BertModel

    from .conftest import make_tokenizer, plant_polarity

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("still-bert")
    model = BertModel(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    plant_polarity(model.embeddings.word_embeddings)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _recipe(tmp: Path, kind: str, model: Path, data: Path, batch: int) -> Path:
    extra = {
        "train.batch_size": batch,
        "train.epochs": 1,
        "train.log_steps": 1,
        "train.lr": 0.01,
        "train.mixed_precision": "no",
        "train.group_by_length": False,
        "train.warmup_ratio": 0.0,
        "data.max_length": 48,
        "method.dropout": 0.0,
        "data.max_train_samples": 64,
        "data.max_eval_samples": 16,
    }
    if kind != "classification":
        extra.update({"task": "causal_lm", "method.target_modules": "all-linear"})
    if kind == "labelled":
        extra["data.prompt_template"] = LM_PROMPT
    tmp.mkdir(parents=True, exist_ok=True)
    return tiny_recipe(tmp, model, data, **extra)


def _train(recipe: Path, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    return subprocess.run(
        [*launch, "-m", "peftkit", "train", str(recipe)], capture_output=True, text=True, env=env, timeout=300
    )


def _train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


KINDS = ["classification", "labelled", "chat", "prompt_completion", "text"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_end_to_end_in_one_and_two_processes(kind, datasets, still_bert, tiny_llama_dir, tmp_path):
    model = still_bert if kind == "classification" else tiny_llama_dir
    one = _train(_recipe(tmp_path / "one", kind, model, datasets[kind], batch=8), processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(_recipe(tmp_path / "two", kind, model, datasets[kind], batch=4), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for run in (tmp_path / "one" / "run", tmp_path / "two" / "run"):
        missing = [f for f in OUTPUTS if not (run / f).is_file()]
        assert not missing, f"{run}: {missing}"
        assert list((run / "checkpoints").iterdir())
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test"]["n"] == 16 and summary["steps"] == 8
    assert "processes: 2 (data parallel" in two.stdout + two.stderr  # the log says how many train
    single, double = _train_losses(tmp_path / "one" / "run"), _train_losses(tmp_path / "two" / "run")
    assert len(single) == len(double) == 8
    assert double == pytest.approx(single, rel=2e-4), (single, double)
    # the second step's loss depends on the first update: equal losses mean equal gradients
    assert len(set(single)) > 1


def test_a_packed_run_counts_examples_not_sequences(datasets, tiny_llama_dir, tmp_path):
    recipe = _recipe(tmp_path, "text", tiny_llama_dir, datasets["text"], batch=4)
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe), "data.packing=true"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_examples"] == 64  # every training row, packed into fewer sequences
    assert summary["train_sequences"] < 64
    assert (tmp_path / "run" / "curves.png").is_file()
