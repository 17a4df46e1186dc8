"""Benchmark: LoRA on a full-precision, 8-bit and NF4 base, on this machine's CPU.

1. The packaged MiniLM on Rotten Tomatoes with recipes/sentiment-minilm-lora.yaml, the base
   in float32, 8-bit and NF4: base linear-weight bytes, test accuracy, train time, peak RSS.
   Each run is an ordinary ``peftkit train`` in its own process.
2. The packaged SmolLM2-135M-Instruct (``smollm2-135m``: its GGUF converted once) with LoRA on every
   linear layer, the base in float32 and NF4, a few training steps at the same batch size:
   peak training memory (peak RSS during the steps minus the RSS before the model was
   loaded, imports paid) and step time. Each in its own process; the loss is peftkit's
   chunked causal-LM loss, as in training.

    .venv/bin/python bench/quantization.py                  # both parts, writes bench/RESULTS-quantization.md
    .venv/bin/python bench/quantization.py --epochs 1 --skip-smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": [], "int8": ["quantization.bits=8"], "nf4": ["quantization.bits=4", "quantization.quant_type=nf4"]}


def minilm(epochs: int) -> dict[str, dict]:
    results = {}
    for mode, extra in MODES.items():
        out = ROOT / "runs" / "bench-quantization" / mode
        cmd = [
            sys.executable,
            "-m",
            "peftkit",
            "train",
            str(ROOT / "recipes" / "sentiment-minilm-lora.yaml"),
            f"output_dir={out}",
            "overwrite=true",
            f"train.epochs={epochs}",
            *extra,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        results[mode] = json.loads((out / "summary.json").read_text())
        print(mode, results[mode]["test"]["accuracy"], results[mode]["train_seconds"], flush=True)
    return results


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def smollm2_worker(mode: str, batch: int, length: int, steps: int, checkpointing: bool, low_memory: bool) -> dict:
    """Runs in its own process: load, (quantize), LoRA, ``steps`` training steps."""
    import ctypes
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.assets import resolve_model
    from peftkit.lm_loss import causal_lm_loss
    from peftkit.methods import LoraConfig, apply_method, trainable_parameters
    from peftkit.prepare import release_freed_memory
    from peftkit.quantize import QuantizationConfig, quantize_model, require_bitsandbytes

    if low_memory:  # as train.low_memory: true does
        release_freed_memory()
    torch.manual_seed(0)
    folder = resolve_model("smollm2-135m")  # converted from its GGUF once, then cached
    # What imports cost (the model's code, bitsandbytes) is not training memory: pay it before the baseline
    require_bitsandbytes()
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    gc.collect()
    baseline = _rss_kib("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # own the weights (not pages of the file's memory map), as training would
        for p in model.parameters():
            p.data = p.data.clone()
    report = None
    if mode == "nf4":
        report = quantize_model(model, QuantizationConfig(bits=4, quant_type="nf4")).as_dict()
    apply_method(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), modules_to_save=[])
    if checkpointing:  # as peftkit train does with train.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    loaded = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    model.train()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        loss = causal_lm_loss(model, ids, ids)  # as peftkit trains decoders: no full-batch logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    peak = _rss_kib("VmHWM")
    return {
        "mode": mode,
        "baseline_rss_mib": baseline / 1024,
        "loaded_rss_mib": loaded / 1024,
        "peak_rss_mib": peak / 1024,
        "tensor_mib": sum(storages.values()) / 2**20,
        "training_memory_mib": (peak - baseline) / 1024,
        "step_seconds": sorted(times)[len(times) // 2],
        "loss": loss.item(),
        "quantization": report,
    }


def smollm2(batches: list[int], length: int, steps: int, checkpointing: bool) -> dict[str, dict]:
    results = {}
    for low_memory in (False, True):
        for batch in batches:
            for mode in ("fp32", "nf4"):
                cmd = (
                    [
                        sys.executable,
                        __file__,
                        "--smollm2-worker",
                        mode,
                        "--batch",
                        str(batch),
                        "--length",
                        str(length),
                        "--steps",
                        str(steps),
                    ]
                    + (["--no-checkpointing"] if not checkpointing else [])
                    + (["--low-memory"] if low_memory else [])
                )
                print("$", " ".join(cmd[1:]), flush=True)
                done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
                key = f"{mode} batch {batch}{', low_memory' if low_memory else ''}"
                results[key] = {
                    **json.loads(done.stdout.strip().splitlines()[-1]),
                    "batch": batch,
                    "reference": key.replace("nf4", "fp32"),
                }
                print(key, results[key], flush=True)
    return results


def report(args: argparse.Namespace, mini: dict | None, smol: dict | None) -> str:
    lines = [
        "# Quantized base: LoRA with the base in float32, 8-bit and NF4 (bitsandbytes, CPU)",
        "",
        *header("quantization.py"),
        "",
    ]
    if mini:
        fp = mini["fp32"]
        fp_bytes = mini["int8"]["quantization"]["base_linear_bytes_before"]
        lines += [
            "## MiniLM on Rotten Tomatoes (recipes/sentiment-minilm-lora.yaml, "
            f"{args.epochs} epoch{'s' if args.epochs > 1 else ''})",
            "",
            "| base | linear weights (MiB) | vs fp32 | test accuracy | vs fp32 (points) | train time (s) "
            "| time vs fp32 | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, s in mini.items():
            q = s.get("quantization") or {}
            size = q.get("base_linear_bytes_after", fp_bytes)
            lines.append(
                f"| {mode} | {size / 2**20:.1f} | {size / fp_bytes:.3f} | {s['test']['accuracy']:.4f} "
                f"| {100 * (s['test']['accuracy'] - fp['test']['accuracy']):+.2f} "
                f"| {s['train_seconds']:.1f} | {s['train_seconds'] / fp['train_seconds']:.2f} "
                f"| {s['peak_rss_bytes'] / 2**20:.0f} |"
            )
        lines.append("")
    if smol:
        lines += [
            f"## SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, {args.length} tokens per sequence, "
            f"{args.steps} steps, gradient checkpointing {'on' if args.checkpointing else 'off'}",
            "",
            "| base, batch | model tensors (MiB) | training memory (MiB) | vs fp32 | peak RSS (MiB) "
            "| median step (s) | step time vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, s in smol.items():
            fp = smol[s["reference"]]
            lines.append(
                f"| {mode} | {s['tensor_mib']:.0f} | {s['training_memory_mib']:.0f} | "
                f"{s['training_memory_mib'] / fp['training_memory_mib']:.3f} | {s['peak_rss_mib']:.0f} "
                f"| {s['step_seconds']:.2f} | {s['step_seconds'] / fp['step_seconds']:.2f} |"
            )
        lines += [
            "",
            "Training memory: the process's peak RSS during the training steps minus its RSS before "
            "the model was loaded, with the imports (Python, torch, transformers, the model's code, "
            "bitsandbytes) already paid in both; the peak is reset after loading and quantizing, so the "
            "float32 copy that quantization starts from does not count. Model tensors: the bytes of the "
            "parameters and buffers (base, LoRA) before training. What the steps add beyond them is the "
            "same work in both (activations, LoRA gradients and AdamW state) plus what the allocator keeps: "
            "glibc holds freed activations in its heap, several hundred MiB here, which the rows with "
            "low_memory (peftkit's `train.low_memory: true`) hand back to the OS at once.",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="SmolLM2 batch sizes")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="SmolLM2: keep every activation (default: gradient checkpointing, as a memory-bound run would)",
    )
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-quantization.md"))
    p.add_argument("--smollm2-worker", choices=["fp32", "nf4"], help=argparse.SUPPRESS)
    p.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smollm2_worker:
        print(
            json.dumps(
                smollm2_worker(
                    args.smollm2_worker, args.batch[0], args.length, args.steps, args.checkpointing, args.low_memory
                )
            )
        )
        return 0
    smol = None if args.skip_smollm2 else smollm2(args.batch, args.length, args.steps, args.checkpointing)
    mini = None if args.skip_minilm else minilm(args.epochs)
    write_report(args.output, report(args, mini, smol).splitlines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
