"""Smoke test of bench/step_budget.py on the tiny BERT: the report has a whole row per precision.

Timings are not checked (the machine is shared); only that the script completes and that each
row's parts are positive and consistent with one another.
"""

from __future__ import annotations

import math
import subprocess
import sys

from .conftest import ROOT


def half_unit(printed: str) -> float:
    """Half a unit in the last digit of a number printed with ``:.3g``."""
    value = abs(float(printed))
    return 0.0 if value == 0 else 0.5 * 10 ** (math.floor(math.log10(value)) - 2)


def test_step_budget_reports_every_part(tmp_path, tiny_bert_dir, sentiment_dir):
    out = tmp_path / "budget.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "step_budget.py"),
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
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in out.read_text().splitlines() if line.startswith(("| float32", "| bf16"))]
    assert table and table[0].startswith("| float32")
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        steps, alone, share, rate, peak, ceiling, fixed, _, rest = cells[1:]
        assert float(steps) > 0 and float(alone) > 0 and float(fixed) > 0 and float(rate) > 0 and float(peak) > 0
        assert abs(float(alone) / float(steps) - float(share.rstrip("%")) / 100) < 0.01
        # the figures are printed to 3 significant digits: the identity holds to their rounding
        rounding = sum(half_unit(c) for c in (steps, alone, fixed, rest))
        assert abs(float(steps) - float(alone) - float(fixed) - float(rest)) <= rounding + 1e-9
        assert float(ceiling.rstrip("%")) > 0


def test_step_budget_without_data_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_budget.py"), "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"step_budget.py: no data at {tmp_path / 'none'}; pass --data"]
