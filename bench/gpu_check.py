"""GPU readiness in one prepared command: the device-agnostic tests on the GPU, and a short LoRA
training benchmark in float32, bf16 and with an NF4 base, with a report written to a folder.

    python3 bench/gpu_check.py OUT_DIR                 # on a CUDA machine (within about 8 minutes)
    python3 bench/gpu_check.py OUT_DIR --device cpu --quick    # the CPU smoke run a test makes

It needs torch, transformers, accelerate, safetensors, pydantic and pyyaml (peft and
bitsandbytes for their checks; without them those are reported as skipped) and nothing from a
hub: the models are built from configs and the data is synthetic. peftkit is imported from this
checkout's ``src/``, installed or not. ``OUT_DIR/report.md`` is the report (commit it as
``bench/RESULTS-gpu.md``), with ``tests.log`` and ``report.json`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
NEEDED = ("torch", "transformers", "accelerate", "safetensors", "pydantic", "yaml")
OPTIONAL = ("peft", "bitsandbytes", "pytest")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (*NEEDED, *OPTIONAL):
        dist = {"yaml": "pyyaml"}.get(name, name)
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_tests(device: str, out: Path, timeout: int) -> dict:
    """tests/test_device.py with PEFTKIT_TEST_DEVICE=device; the log goes to OUT/tests.log."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped: pytest is not installed"}
    env = {
        **os.environ,
        "PEFTKIT_TEST_DEVICE": device,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_device.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        log, code = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout} s", -1
    (out / "tests.log").write_text(log if isinstance(log, str) else log.decode())
    lines = [line for line in str(log).splitlines() if line.strip()]
    return {
        "status": "passed" if code == 0 else f"failed (exit {code})",
        "summary": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - began, 1),
    }


def job_model(quick: bool, nf4: bool, device: str):
    """A MiniLM-shaped BERT classifier from its config (random weights), LoRA r=8 on query and value."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit.methods import LoraConfig, apply_method

    shape = (
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if quick
        else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2, **shape))
    if nf4:
        from peftkit.config import QuantizationConfig
        from peftkit.quantize import quantize_model

        quantize_model(
            model, QuantizationConfig(bits=4, quant_type="nf4", compute_dtype="bfloat16"), skip=["classifier"]
        )
    apply_method(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    return model.to(device).train()


def bench_one(precision: str, nf4: bool, device: str, quick: bool, steps: int) -> dict:
    """Training steps/s and examples/s of one setting, on random token batches of 32 x 128."""
    import torch

    from peftkit import accel
    from peftkit.methods import trainable_parameters
    from peftkit.prepare import adamw

    model = job_model(quick, nf4, device)
    params = list(trainable_parameters(model).values())
    optimizer = adamw(params, lr=1e-4)
    batch, length = (4, 16) if quick else (32, 128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (steps + 3, batch, length), generator=g)
    labels = torch.randint(0, 2, (steps + 3, batch), generator=g)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    speed = accel.StepSpeedups(model, dtype) if accel.wanted("auto", device) else contextlib.nullcontext()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        with speed:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=ids[i].to(device), labels=labels[i].to(device)).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(3):  # warm-up
        step(i)
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    losses = [step(3 + i) for i in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {
        "setting": f"{precision}{' + NF4 base' if nf4 else ''}",
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 2),
        "examples_per_s": round(steps * batch / seconds, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
    }


def benchmark(device: str, quick: bool) -> list[dict]:
    rows = []
    steps = 5 if quick else 50
    for precision, nf4 in (("fp32", False), ("bf16", False), ("bf16", True)):
        if nf4 and importlib.util.find_spec("bitsandbytes") is None:
            rows.append({"setting": "bf16 + NF4 base", "skipped": "bitsandbytes is not installed"})
            continue
        try:
            rows.append(bench_one(precision, nf4, device, quick, steps))
        except Exception as exc:  # a report of what failed beats no report
            rows.append(
                {
                    "setting": f"{precision}{' + NF4 base' if nf4 else ''}",
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                }
            )
    return rows


def report(out: Path, info: dict) -> str:
    lines = [
        "# GPU readiness: device tests and a short LoRA training benchmark",
        "",
        f"- command: `python3 bench/gpu_check.py OUT_DIR{' --quick' if info['quick'] else ''}`"
        f" (device {info['device']}: {info['device_name']})",
        f"- date: {info['date']}; python {info['python']}",
        "- versions: " + ", ".join(f"{k} {v or 'absent'}" for k, v in info["versions"].items()),
        "",
        "## Device tests (tests/test_device.py)",
        "",
        f"- {info['tests']['status']}: {info['tests'].get('summary', '')} "
        f"({info['tests'].get('seconds', '-')} s; full log in tests.log)",
        "",
        "## LoRA training steps (MiniLM-shaped BERT from its config, r=8 on query/value, batch 32 x 128)",
        "",
        "| setting | steps | seconds | steps/s | examples/s | peak GPU memory (MiB) | finite loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in info["benchmark"]:
        if "steps" not in r:
            lines.append(f"| {r['setting']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['steps']} | {r['seconds']} | {r['steps_per_s']} | {r['examples_per_s']} "
            f"| {r['peak_gpu_mib'] if r['peak_gpu_mib'] is not None else '-'} | {r['finite']} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(info, indent=1) + "\n")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for report.md, report.json and tests.log")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (the CPU smoke test)")
    p.add_argument("--test-timeout", type=int, default=300)
    args = p.parse_args()
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check.py: missing packages: {', '.join(missing)} (carry their wheels)", file=sys.stderr)
        return 2
    import datetime
    import platform

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": device,
        "quick": args.quick,
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
    }
    info["tests"] = run_tests(device, out, args.test_timeout)
    info["benchmark"] = benchmark(device, args.quick)
    print(report(out, info), end="")
    ok = info["tests"]["status"] == "passed" and all("error" not in r for r in info["benchmark"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
