"""Smoke test of bench/frozen.py on the tiny BERT: every product row and a step row per precision.

Timings are not checked (the machine is shared); only that the script completes and that its
ratios are those of its own columns.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from peftkit.accel.frozen import can_pack

from .conftest import ROOT


@pytest.mark.skipif(not can_pack(torch.float32), reason="this torch build cannot prepack weights with oneDNN")
def test_frozen_bench_reports_products_and_steps(tmp_path, tiny_bert_dir, sentiment_dir):
    out = tmp_path / "frozen.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "frozen.py"),
            "--data",
            str(sentiment_dir),
            "--model",
            str(tiny_bert_dir),
            "--text-column",
            "text",
            "--samples",
            "96",
            "--batch-size",
            "8",
            "--max-length",
            "32",
            "--batches",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    products = [line for line in lines if line.startswith(("| float32 | ", "| bfloat16 | "))]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in products if "→" in line]
    assert len(cells) % 9 == 0 and cells  # 3 layer shapes x 3 batch sizes per precision
    for row in cells:
        own, plain, packed, ratio, grad, grad_packed, grad_ratio = map(float, row[3:])
        assert min(own, plain, packed, grad, grad_packed) > 0
        assert abs(packed / own - ratio) < 0.01 * ratio + 0.002
        assert abs(grad_packed / grad - grad_ratio) < 0.01 * grad_ratio + 0.002
    step_rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if line.startswith(("| float32 | ", "| bf16 autocast | ")) and "→" not in line
    ]
    assert step_rows and step_rows[0][0] == "float32"
    for row in step_rows:
        own, prepared, ratio = map(float, row[1:4])
        assert own > 0 and prepared > 0 and abs(prepared / own - ratio) < 0.01 * ratio + 0.002
        assert "frozen linear layers:" in row[4]


def test_frozen_bench_without_data_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "frozen.py"), "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"frozen.py: no data at {tmp_path / 'none'}; pass --data"]
