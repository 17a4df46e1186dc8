"""Smoke test of bench/speed.py on the tiny BERT: every run, measure and report row is there.

Timings are not checked (the machine is shared); only that the benchmark completes and its
output is whole and consistent.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from .conftest import ROOT, has_module, review, write_jsonl

pytestmark = pytest.mark.skipif(not has_module("peft"), reason="the benchmark compares against peft")


def test_speed_benchmark_runs_end_to_end(tmp_path, tiny_bert_dir):
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    rows = lambda n: [{"sentence": review(rng, y), "label": y} for y in (rng.randint(0, 1) for _ in range(n))]  # noqa: E731
    write_jsonl(data / "train.jsonl", rows(80))
    write_jsonl(data / "validation.jsonl", rows(24))
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "speed.py"),
            "--data",
            str(data),
            "--model",
            str(tiny_bert_dir),
            "--train-samples",
            "64",
            "--rounds",
            "2",
            "--tutorial-steps",
            "1",
            "--inference-repeats",
            "1",
            "--max-length",
            "32",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    res = json.loads((tmp_path / "work" / "results.json").read_text())
    assert res["sizes"] == {"train": 64, "validation": 24, "num_labels": 2}
    assert res["work"]["tokens"]["train"] > 64 and res["work"]["linear_params"] > 0 and res["work"]["lora_params"] > 0
    for variant in ("peftkit", "trainer", "trainer_tuned"):
        assert len(res["runs"][variant]) == 2
        for run in res["runs"][variant]:
            assert 0 < run["loop_seconds"] < run["wall_seconds"]
            assert 0.0 <= run["accuracy"] <= 1.0 and run["peak_rss_bytes"] > 2**20
    assert all(
        res["inference"][k] > 0 for k in ("base", "peftkit_unmerged", "peftkit_merged", "peft_unmerged", "peft_merged")
    )
    assert res["tutorial"]["steps"] == 4 and res["tutorial"]["seconds_per_step"] > 0
    assert res["peaks"]["float32"] > 1e9 and all(math.isfinite(v) for v in res["peaks"].values())
    assert all(len(v) == 2 for v in res["round_peaks"].values()) and "float32" in res["interleaved"]
    for r in res["interleaved"].values():
        assert 0 < r["utilisation"] < 1.5 and r["step_seconds"] > 0 and r["peak_min"] <= r["peak_max"]

    text = out.read_text()
    for needed in (
        "## Training",
        "## Inference",
        "## Against the targets",
        "## Useful-FLOP utilisation with interleaved",
        "peftkit LoRA",
        "peft + Trainer (defaults)",
        "the tutorial's way",
        "useful-FLOP utilisation, peftkit fp32",
        "peak RSS, peftkit / Trainer defaults",
        "inference, peftkit merged / base",
        "training loop time, peftkit / Trainer tuned",
    ):
        assert needed in text, needed
    assert "nan" not in text.lower().replace("nanos", "")
