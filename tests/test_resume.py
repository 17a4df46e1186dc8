"""Checkpoints and exact resume: SIGKILL at random steps (and mid-checkpoint), SIGTERM, NaN,
unwritable output, changed configs, early stopping."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import PeftkitError, load_recipe
from peftkit.checkpoint import find_resume, list_checkpoints
from peftkit.train import train

from .conftest import tiny_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 40  # 320 examples / batch 16 = 20 steps an epoch, 2 epochs


def recipe_for(tmp: Path, tiny_bert_dir, sentiment_dir, name: str) -> Path:
    path = tiny_recipe(
        tmp,
        tiny_bert_dir,
        sentiment_dir,
        **{
            "output_dir": str(tmp / name),
            "train.epochs": 2,
            "train.save_steps": 1,
            "train.eval_steps": 5,
            "train.log_steps": 3,
            "train.save_total_limit": 2,
            "method.dropout": 0.1,
        },
    )
    return path.rename(tmp / f"{name}.yaml")


def start(recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "peftkit", "train", str(recipe), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def history(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("examples_per_s", None)  # timings, not results
        r.pop("step_seconds", None)
    return rows


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run)[-1][1]
    return {
        **{"final." + k: v for k, v in load_file(str(last / "trainable.safetensors")).items()},
        **{"adapter." + k: v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items()},
    }


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = final_tensors(run), final_tensors(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bitwise: same thread count, same CPU
    assert history(run) == history(ref)
    assert (
        json.loads((run / "summary.json").read_text())["best_step"]
        == json.loads((ref / "summary.json").read_text())["best_step"]
    )


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    recipe = recipe_for(tmp, tiny_bert_dir, sentiment_dir, "ref")
    proc = start(recipe)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return tmp, tmp / "ref"


def stopped_at(recipe: Path, point: str, *extra: str) -> subprocess.CompletedProcess:
    """Run ``recipe`` until the deterministic kill point ``point`` (``step:N``, ``checkpoint:N``,
    ``term:N``; see ``checkpoint.stop_for_test``) stops it."""
    return subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe), *extra],
        capture_output=True,
        text=True,
        env={**ENV, "PEFTKIT_TEST_STOP": point},
        timeout=600,
    )


def newest_step(run: Path) -> int:
    found = list_checkpoints(run)
    return found[-1][0] if found else 0


def writing_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".") for p in folder.iterdir())


def test_sigkill_at_random_steps_then_resume_is_exact(reference, tiny_bert_dir, sentiment_dir):
    tmp, ref = reference
    rng = random.Random(1234)
    targets = sorted(rng.sample(range(2, STEPS - 1), 4))
    for n, point in enumerate([*(f"step:{t}" for t in targets), "checkpoint:10"]):
        recipe = recipe_for(tmp, tiny_bert_dir, sentiment_dir, f"kill{n}")
        run = tmp / f"kill{n}"
        killed = stopped_at(recipe, point)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (run / "summary.json").exists()
        at = int(point.split(":")[1])
        if point.startswith("checkpoint"):  # killed halfway through writing checkpoint 10
            assert writing_checkpoint(run) and newest_step(run) == at - 1
        else:  # killed after step N, before its checkpoint
            assert newest_step(run) == at - 1 and not writing_checkpoint(run)
        resumed = start(recipe, "resume=auto")
        out, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
        assert f"(step {at - 1})" in out
        assert not writing_checkpoint(run)  # temporaries of the killed writer were removed
        assert_same_run(run, ref)


def test_sigterm_writes_a_checkpoint_and_exits_143(reference, tiny_bert_dir, sentiment_dir):
    tmp, ref = reference
    recipe = recipe_for(tmp, tiny_bert_dir, sentiment_dir, "term")
    run = tmp / "term"
    proc = stopped_at(recipe, "term:7", "train.save_steps=1000")  # only the signal (and epoch ends) checkpoint
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM at step 7" in proc.stderr and "resume=auto" in proc.stderr
    assert newest_step(run) == 7
    resumed = start(recipe, "resume=auto", "train.save_steps=1000")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert history(run) == history(ref)


def test_changed_config_resume(reference, tiny_bert_dir, sentiment_dir, capsys):
    tmp, ref = reference
    recipe = tmp / "ref.yaml"
    with pytest.raises(PeftkitError, match="different 'method'"):
        train(load_recipe(recipe, ["resume=auto", "method.r=8"]), echo=lambda _: None)
    with pytest.raises(PeftkitError, match="different 'model'"):
        train(load_recipe(recipe, ["resume=auto", "model=other"]), echo=lambda _: None)
    said = []
    summary = train(load_recipe(recipe, ["resume=auto", "train.epochs=3", "train.lr=0.01"]), echo=said.append)
    assert any("train.epochs 2.0 -> 3.0" in s for s in said) and any("resuming from" in s for s in said)
    assert summary["steps"] == 60


def test_sigkill_before_the_first_checkpoint_then_resume_auto_starts_over(reference, tiny_bert_dir, sentiment_dir):
    tmp, _ = reference  # the shared reference may have been resumed further by now: this test makes its own
    ref_recipe = recipe_for(tmp, tiny_bert_dir, sentiment_dir, "early-ref")
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(ref_recipe), "train.save_steps=1000"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    ref = tmp / "early-ref"
    recipe = recipe_for(tmp, tiny_bert_dir, sentiment_dir, "early")
    run = tmp / "early"
    killed = stopped_at(recipe, "step:4", "train.save_steps=1000")  # the first checkpoint would come at step 20
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list_checkpoints(run) and (run / "config.yaml").is_file()
    assert (run / "metrics.jsonl").read_text().strip()  # it had begun to log
    # another run's config in this folder is not resumed, nor restarted over it
    other = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe), "train.save_steps=1000", "method.r=8", "resume=auto"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert other.returncode == 2 and "output_dir exists and is not empty" in other.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe), "train.save_steps=1000", "resume=auto"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "no complete checkpoint; starting from step 0" in resumed.stdout
    assert_same_run(run, ref)


class _Planted:
    """Unpickling this writes a file: the proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("planted", ["state.json", "state.safetensors", "state.pt"])
def test_a_checkpoint_with_a_planted_pickle_is_refused_and_nothing_runs(reference, tmp_path, planted):
    import pickle
    import shutil

    _, ref = reference
    run = tmp_path / "handed"
    shutil.copytree(ref, run)
    ckpt = list_checkpoints(run)[-1][1]
    marker = tmp_path / "marker"
    if planted == "state.pt":  # a checkpoint in the old pickled layout, state.json absent
        (ckpt / "state.json").unlink()
    (ckpt / planted).write_bytes(pickle.dumps(_Planted(marker)))
    recipe = tmp_path / "handed.yaml"
    recipe.write_text((run / "config.yaml").read_text().replace(str(ref), str(run)))
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe), f"resume={ckpt}"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("peftkit: error: the checkpoint") and done.stderr.count("\n") == 1
    assert not marker.exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    import peftkit.train as train_module

    real_prepare = train_module.prepare
    calls = {"n": 0}

    def prepare_with_nan(cfg):
        prep = real_prepare(cfg)

        def hook(module, args, kwargs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] >= 7 and output.loss is not None:
                    output.loss = output.loss * float("nan")
            return output

        prep.model.register_forward_hook(hook, with_kwargs=True)
        return prep

    monkeypatch.setattr(train_module, "prepare", prepare_with_nan)
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.save_steps": 2})
    with pytest.raises(PeftkitError, match="at step 7"):
        train(load_recipe(recipe), echo=lambda _: None)
    run = tmp_path / "run"
    assert newest_step(run) == 6 and find_resume(run, "auto").name == "step-00000006"


def test_unwritable_checkpoint_keeps_the_previous_one(tiny_bert_dir, sentiment_dir, tmp_path, monkeypatch):
    import peftkit.checkpoint as ck

    real_encode = ck.encode_tree
    calls = {"n": 0}

    def failing_encode(value):  # the third checkpoint's state cannot be written
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device", "state.json")
        return real_encode(value)

    monkeypatch.setattr(ck, "encode_tree", failing_encode)
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.save_steps": 4})
    with pytest.raises(PeftkitError, match="No space left"):
        train(load_recipe(recipe), echo=lambda _: None)
    monkeypatch.setattr(ck, "encode_tree", real_encode)
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [4, 8]
    assert not writing_checkpoint(run)


def test_unwritable_output_dir_is_one_line(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    from peftkit.cli import main

    (tmp_path / "afile").write_text("x")
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, output_dir=str(tmp_path / "afile" / "run"))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error:") and err.count("\n") == 1


def test_early_stopping_restores_the_best_adapter(tiny_bert_dir, sentiment_dir, tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        tiny_bert_dir,
        sentiment_dir,
        **{
            "train.epochs": 10,
            "train.eval_steps": 5,
            "train.metric_for_best": "loss",
            "train.early_stopping": {"metric": "accuracy", "patience": 3},
        },
    )
    summary = train(load_recipe(recipe), echo=lambda _: None)
    run = tmp_path / "run"
    evals = [r for r in history(run) if r["type"] == "eval" and r["split"] == "validation"]
    accs = [e["accuracy"] for e in evals]
    first_best = accs.index(max(accs[: len(accs)]))
    # stopped at the 3rd evaluation without a higher accuracy than the best before it
    assert summary["early_stopped_at"] == evals[first_best + 3]["step"] == evals[-1]["step"]
    assert summary["steps"] < 200
    best = min(evals, key=lambda e: e["loss"])
    assert summary["best_step"] == best["step"]
    ckpt = list_checkpoints(run)[-1][1]
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    saved_best = load_file(str(ckpt / "best.safetensors"))
    assert all(torch.equal(adapter["base_model.model." + k], v) for k, v in saved_best.items())


def test_an_8bit_optimizer_checkpoints_and_resumes_bit_for_bit(tiny_llama_dir, sentiment_dir, tmp_path):
    """bitsandbytes' 8-bit AdamW states share their quantisation maps between tensors (which
    safetensors refuses to write as such); they appear once a trainable tensor has 4,096
    elements, here the rank-128 LoRA factors."""
    from .conftest import LM_PROMPT

    def recipe(name: str) -> Path:
        path = tiny_recipe(
            tmp_path,
            tiny_llama_dir,
            sentiment_dir,
            task="causal_lm",
            **{
                "output_dir": str(tmp_path / name),
                "method.r": 128,
                "method.target_modules": "all-linear",
                "data.prompt_template": LM_PROMPT,
                "data.max_train_samples": 64,
                "data.max_eval_samples": 16,
                "train.optimizer": "adamw_8bit",
                "train.batch_size": 8,
                "train.epochs": 2,
                "train.save_steps": 1,
                "train.log_steps": 1,
                "train.lr": 0.002,
            },
        )
        return path.rename(tmp_path / f"{name}.yaml")

    ref = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe("ref"))],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr
    killed = stopped_at(recipe("kill"), "step:11")
    assert killed.returncode == -signal.SIGKILL and newest_step(tmp_path / "kill") == 10, killed.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(tmp_path / "kill.yaml"), "resume=auto"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "kill", tmp_path / "ref")
