"""What each default speed change buys, on the same training steps, side by side.

One process per allocator setting: glibc's default, and "kept" (freed blocks up to 32 MiB stay
in the heap, which is not trimmed, so activations could reuse mapped pages; measured here and not
adopted: it did not pay). Inside each process every batch runs under each dropout setting in
turn, in a rotating order, so drift falls on all:

- torch: nn.Dropout and SDPA as transformers ships them;
- fast hidden: FastDropout for the model's dropout layers, SDPA as shipped;
- fast hidden + attention: FastDropout and the attention function with the same mask (the default).

    .venv/bin/python bench/step_ablation.py                      # SST-2 subset, writes bench/RESULTS-steps.md
    .venv/bin/python bench/step_ablation.py --max-length 256 --data ../shared/data/imdb --text-column text
    .venv/bin/python bench/step_ablation.py --precision bf16 --out bench/RESULTS-steps-bf16.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sentiment-minilm-lora.yaml"
MODES = ("torch", "fast hidden", "fast hidden + attention")


def child(args: argparse.Namespace) -> dict:
    import torch

    from peftkit import prepare as preparing
    from peftkit.accel import StepSpeedups
    from peftkit.config import load_recipe
    from peftkit.data import LengthGroupedBatches

    if args.allocator == "kept":  # glibc keeps freed blocks up to 32 MiB and does not trim its heap
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt(-3, 32 * 2**20), mallopt(-1, 2**30), mallopt(-2, 64 * 2**20)

    cfg = load_recipe(
        RECIPE,
        [
            f"dataset={args.data}",
            f"data.text_column={args.text_column}",
            "data.test_split=null",
            f"data.max_length={args.max_length}",
            f"data.max_train_samples={args.samples}",
            "data.max_eval_samples=8",
            "method.r=8",
            "method.alpha=16",
            "method.target_modules=[query,value]",
        ],
    )
    prep = preparing.prepare(cfg)
    model, task = prep.model, prep.task
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    layers = {
        "torch": contextlib.nullcontext(),  # the dropout changes alone: no prepared products
        "fast hidden": StepSpeedups(model, dtype, products=False, attention=False),
        "fast hidden + attention": StepSpeedups(model, dtype, products=False),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    feats = task.features["train"]
    batches = list(LengthGroupedBatches([len(f["input_ids"]) for f in feats], 32, seed=0))[: args.steps]
    model.train()

    def step(idx: list[int], mode: str) -> float:
        began = time.perf_counter()
        with layers[mode]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = task.loss(model, task.batch(idx))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    for idx in batches[:3]:  # warm-up
        step(idx, MODES[-1])
    # every batch runs under each setting back to back, in a rotating order, so that drift in the
    # machine's speed falls on all settings alike
    times = dict.fromkeys(MODES, 0.0)
    for rnd in range(args.rounds):
        for i, idx in enumerate(batches):
            shift = (rnd + i) % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                times[mode] += step(idx, mode)
    times = {m: t / args.rounds for m, t in times.items()}
    tokens = sum(len(feats[i]["input_ids"]) for b in batches for i in b)
    return {"seconds": times, "steps": len(batches), "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: steps under bf16 autocast")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-steps.md"))
    p.add_argument("--allocator", choices=["glibc default", "kept"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allocator:
        Path(args.result).write_text(json.dumps(child(args)))
        return 0
    if not Path(args.data).exists():
        print(f"step_ablation.py: no data at {args.data}", file=sys.stderr)
        return 2
    results = {}
    for allocator in ("glibc default", "kept"):
        out = Path(f"/tmp/step_ablation_{os.getpid()}.json")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--allocator", allocator, "--result", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        results[allocator] = json.loads(out.read_text())
        out.unlink()
    ref = results["glibc default"]["seconds"]["torch"]
    first = results["kept"]
    lines = [
        "# Step-time ablation of the default speed changes (MiniLM, LoRA r=8 on query/value, batch 32)",
        "",
        *header("step_ablation.py"),
        f"- the same {first['steps']} length-grouped training steps ({first['tokens']:,} real tokens, max length "
        f"{args.max_length}) per measurement, each batch under every setting in turn; seconds per pass, the mean of "
        f"{args.rounds} passes; {'bf16 autocast' if args.precision == 'bf16' else 'float32'}",
        "",
        "| allocator | dropout | seconds | relative to torch's dropout with glibc's default allocator |",
        "|---|---|---|---|",
    ]
    for allocator, res in results.items():
        for mode in MODES:
            sec = res["seconds"][mode]
            lines.append(f"| {allocator} | {mode} | {sec:.2f} | {sec / ref:.3f} |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
