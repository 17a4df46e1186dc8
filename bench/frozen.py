"""The frozen layers' prepared products (``peftkit.accel.frozen``) against the layers' own forward.

Two measurements, each in one process with the variants in turn so that drift falls on all:

- the products of MiniLM's linear shapes (384 to 384, 384 to 1536, 1536 to 384) at the padded
  rows of a short and a long SST-2 batch: the forward as ``nn.Linear`` takes it in the step's
  precision (under bf16 autocast that includes casting the float32 weight), the same product
  on a weight already in the compute dtype, and the oneDNN-packed one; and the input gradient
  ``g W`` as a tensor product against the packed one;
- LoRA training steps (r=8 on query/value, batch 32, the SST-2 subset of ``bench/speed.py``)
  with the layers' own forward against the same steps with the prepared products (the speed
  layer's dropout in both), alternating
  every 5 batches.

    .venv/bin/python bench/frozen.py             # writes bench/RESULTS-frozen.md
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

from _shared import header, write_report
from speed import add_job_options, lora_job, train_step

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(384, 384), (1536, 384), (384, 1536)]  # (out, in)


def best_of(run, calls: int, repeats: int = 5) -> float:
    """Microseconds per call, the best of ``repeats`` runs of ``calls`` calls."""
    run()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - began) / calls)
    return best * 1e6


def own_forward(layer, x, autocast) -> None:
    with autocast:
        layer(x)


def products(dtype, rows_list: list[int]) -> list[str]:
    import torch

    from peftkit.accel.frozen import FrozenProduct

    torch.manual_seed(0)
    name = str(dtype).removeprefix("torch.")
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    lines = []
    for out_f, in_f in SHAPES:
        layer = torch.nn.Linear(in_f, out_f).requires_grad_(False)
        plain, packed = FrozenProduct.of(layer, dtype, pack=False), FrozenProduct.of(layer, dtype, pack=True)
        for rows in rows_list:
            x, g = torch.randn(rows, in_f, dtype=dtype), torch.randn(rows, out_f, dtype=dtype)
            calls = max(5, 20_000_000 // (rows * in_f * out_f))
            t = {
                "own": best_of(partial(own_forward, layer, x, autocast), calls),
                "plain": best_of(partial(plain.forward, x), calls),
                "packed": best_of(partial(packed.forward, x), calls),
                "grad": best_of(partial(plain.input_grad, g), calls),
                "grad_packed": best_of(partial(packed.input_grad, g), calls),
            }
            lines.append(
                f"| {name} | {in_f} → {out_f} | {rows} | {t['own']:.1f} | {t['plain']:.1f} | "
                f"{t['packed']:.1f} | {t['packed'] / t['own']:.3f} | {t['grad']:.1f} | "
                f"{t['grad_packed']:.1f} | {t['grad_packed'] / t['grad']:.3f} |"
            )
    return lines


def steps(args: argparse.Namespace, bf16: bool) -> dict:
    import torch

    from peftkit.accel import StepSpeedups

    model, task, params, optimizer, lengths, batches = lora_job(args)
    batches = batches[: args.batches]
    dtype = torch.bfloat16 if bf16 else torch.float32
    frozen = StepSpeedups(model, dtype)
    blocks = {"own": StepSpeedups(model, dtype, products=False), "prepared": frozen}
    model.train()
    for b in batches[:3]:  # warm-up, not counted
        for block in blocks.values():
            train_step(model, task, params, optimizer, b, block, bf16)
    seconds = dict.fromkeys(blocks, 0.0)
    for n, start in enumerate(range(0, len(batches), 5)):
        for name in list(blocks) if n % 2 == 0 else list(blocks)[::-1]:
            began = time.perf_counter()
            for b in batches[start : start + 5]:
                train_step(model, task, params, optimizer, b, blocks[name], bf16)
            seconds[name] += time.perf_counter() - began
    return {
        "seconds": seconds,
        "steps": len(batches),
        "describe": frozen.describe(),
        "rows": sorted({len(b) * max(lengths[i] for i in b) for b in batches}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_options(p)
    p.add_argument("--batches", type=int, default=125, help="steps per variant and precision (125: one epoch)")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-frozen.md"))
    args = p.parse_args()
    if not Path(args.data).exists():
        print(f"frozen.py: no data at {args.data}; pass --data", file=sys.stderr)
        return 2
    import torch

    from peftkit.accel.frozen import can_pack
    from peftkit.precision import native_bf16

    if not can_pack(torch.float32):
        print("frozen.py: this torch build cannot prepack weights with oneDNN; nothing to compare", file=sys.stderr)
        return 2
    precisions = [False] + ([True] if native_bf16() and can_pack(torch.bfloat16) else [])
    results = {bf16: steps(args, bf16) for bf16 in precisions}
    rows = results[False]["rows"]
    rows_list = [rows[0], rows[len(rows) // 2], rows[-1]]
    lines = [
        "# The frozen layers' prepared products against the layers' own forward",
        "",
        *header("frozen.py"),
        f"- products: microseconds per call, the best of 5 runs; rows {', '.join(map(str, rows_list))} are the "
        "padded tokens of the shortest, the median and the longest batch of the steps below",
        "- own: `nn.Linear` in the step's precision (bf16: under autocast, casting the float32 weight at every "
        "call); plain: the product on a weight already in the compute dtype; packed: oneDNN's prepacked weight",
        "",
        "| dtype | layer | rows | own (µs) | plain (µs) | packed (µs) | packed / own | input gradient (µs) "
        "| packed (µs) | packed / tensor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bf16 in precisions:
        lines += products(torch.bfloat16 if bf16 else torch.float32, rows_list)
    first = results[False]
    lines += [
        "",
        f"- steps: {first['steps']} length-grouped MiniLM LoRA steps (r=8 on query/value, batch "
        f"{args.batch_size}, max length {args.max_length}) per variant, alternating every 5 batches",
        "",
        "| precision | layers' own forward (s) | prepared products (s) | prepared / own | the products |",
        "|---|---|---|---|---|",
    ]
    for bf16, res in results.items():
        sec = res["seconds"]
        lines.append(
            f"| {'bf16 autocast' if bf16 else 'float32'} | {sec['own']:.4g} | {sec['prepared']:.4g} | "
            f"{sec['prepared'] / sec['own']:.3f} | {res['describe']} |"
        )
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
