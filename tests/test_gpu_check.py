"""bench/gpu_check.py, the prepared GPU command, run on the CPU so that it cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "report.json").read_text())
    assert info["device"] == "cpu" and info["tests"]["status"] == "passed"
    assert " passed" in info["tests"]["summary"] and "failed" not in info["tests"]["summary"]
    rows = {r["setting"]: r for r in info["benchmark"]}
    assert set(rows) == {"fp32", "bf16", "bf16 + NF4 base"}
    for row in rows.values():
        assert row["finite"] and row["steps_per_s"] > 0 and row["steps"] == 5
    report = (out / "report.md").read_text()
    assert "| bf16 + NF4 base | 5 |" in report and "passed" in report
    assert (out / "tests.log").read_text().strip()
