"""The same training loop under torchrun with 2 CPU processes (DDP over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import tiny_recipe


def test_two_process_ddp_training(tiny_bert_dir, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.batch_size": 8})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "peftkit",
        "train",
        str(recipe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation"]["accuracy"] >= 0.9
    # each process took half of every epoch: 320 examples / (8 x 2) = 20 steps an epoch
    train_steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "train"
    ]
    assert max(train_steps) == 4 * 20
    assert proc.stdout.count("test accuracy") == 1  # only process 0 reports and writes
    evals = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "eval" and json.loads(x)["split"] == "validation"
    ]
    assert all(e["n"] == 80 for e in evals)  # gathered from both processes, nothing lost or doubled
