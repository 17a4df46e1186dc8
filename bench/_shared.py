"""What every benchmark report starts with (command, machine, date), and how it is written."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path


def command(script: str) -> str:
    """How this run was started, as a reader would retype it."""
    return " ".join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]])


def machine() -> str:
    """Architecture, CPU model, usable cores and Python version."""
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return (
        f"{platform.machine()} {cpu}".rstrip() + f", {len(os.sched_getaffinity(0))} CPU cores; "
        f"python {platform.python_version()}"
    )


def header(script: str) -> list[str]:
    """The report's command, machine and date lines."""
    return [
        f"- command: `{command(script)}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
    ]


def write_report(path: Path | str, lines: list[str]) -> str:
    """Write the report's lines to ``path``, print them, and return the text."""
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    print(text)
    return text
