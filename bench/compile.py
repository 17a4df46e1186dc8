"""Does torch.compile pay for LoRA training steps on this machine? Eager against compiled, side by side.

One process per precision (float32, and bf16 autocast where the CPU has native bf16). In each,
the same model is run eagerly and through ``torch.compile(model, dynamic=True)`` (one compile
for all sequence lengths). The first compiled steps are timed on their own (they include the
compile); after that every chunk of batches runs eagerly and compiled in turn, alternating which
goes first, so drift falls on both.

    .venv/bin/python bench/compile.py                 # SST-2 subset, writes bench/RESULTS-compile.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sentiment-minilm-lora.yaml"


def child(args: argparse.Namespace) -> dict:
    import torch

    from peftkit.config import load_recipe
    from peftkit.data import LengthGroupedBatches
    from peftkit.prepare import prepare

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
            "method.dropout=0.0",
            "method.target_modules=[query,value]",
        ],
    )
    prep = prepare(cfg)
    model, task = prep.model, prep.task
    compiled = torch.compile(model, dynamic=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    feats = task.features["train"]
    batches = list(LengthGroupedBatches([len(f["input_ids"]) for f in feats], 32, seed=0))
    model.train()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def run(net: torch.nn.Module, chunk: list[list[int]]) -> float:
        began = time.perf_counter()
        for idx in chunk:
            with autocast():
                loss = task.loss(net, task.batch(idx))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    run(model, batches[:3])  # eager warm-up
    first = args.first_steps
    compile_seconds = run(compiled, batches[:first])
    eager_first = run(model, batches[:first])
    timed = batches[first : first + args.steps]
    totals = {"eager": 0.0, "compiled": 0.0}
    for n, start in enumerate(range(0, len(timed), 5)):
        chunk = timed[start : start + 5]
        for name in ("eager", "compiled") if n % 2 == 0 else ("compiled", "eager"):
            totals[name] += run(model if name == "eager" else compiled, chunk)
    return {
        "precision": args.precision,
        "first_compiled": compile_seconds,
        "first_eager": eager_first,
        "first_steps": first,
        "steps": len(timed),
        **totals,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps after the first ones")
    p.add_argument("--first-steps", type=int, default=5, help="compiled steps timed with the compile")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-compile.md"))
    p.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.precision:
        print(json.dumps(child(args)))
        return 0
    if not Path(args.data).is_dir():
        print(f"compile.py: no data folder {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "src"))
    from peftkit.precision import native_bf16

    rows = []
    for precision in ["fp32"] + (["bf16"] if native_bf16() else []):
        cmd = [
            sys.executable,
            __file__,
            "--precision",
            precision,
            "--data",
            args.data,
            "--text-column",
            args.text_column,
            "--samples",
            str(args.samples),
            "--max-length",
            str(args.max_length),
            "--steps",
            str(args.steps),
            "--first-steps",
            str(args.first_steps),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        "# torch.compile against eager LoRA training steps",
        "",
        *header("compile.py"),
        f"- job: MiniLM, LoRA r=8 on query/value, batch 32, max length {args.max_length}, length-grouped SST-2 "
        f"batches ({args.samples} training examples); `torch.compile(model, dynamic=True)`",
        "",
        "| precision | first steps, compiled (s) | the same steps eager (s) | steady steps | eager (s/step) "
        "| compiled (s/step) | compiled / eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, c = r["eager"] / r["steps"], r["compiled"] / r["steps"]
        lines.append(
            f"| {r['precision']} | {r['first_compiled']:.1f} ({r['first_steps']} steps) | {r['first_eager']:.2f} "
            f"| {r['steps']} | {e:.3f} | {c:.3f} | {c / e:.3f} |"
        )
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
