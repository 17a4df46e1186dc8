"""Where a LoRA training step's time goes: the frozen layers' matrix multiplies against the rest.

For each precision (float32, and bf16 autocast where the CPU has native bf16) one epoch of
peftkit's training steps (LoRA r=8 on query/value, batch 32, length-grouped, as in
``bench/speed.py``) is timed against two things measured in the same process, in turn for
every chunk of batches so that drift falls on all three:

- the multiplies alone: for every batch, each frozen linear layer of the encoder's forward
  product and input-gradient product at that batch's padded shape, taken as the steps take
  them (``peftkit.accel.frozen``: oneDNN-packed weights where it can), on random inputs of the
  compute dtype made beforehand, with nothing else around them;
- the fixed cost: the same number of steps on a batch of the two shortest examples, where the
  arithmetic is negligible: what is left is per-step and per-op overhead, and reading every
  weight.

    .venv/bin/python bench/step_budget.py             # SST-2 subset, writes bench/RESULTS-step-budget.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _shared import header, write_report
from speed import add_job_options, best_multiply, lora_job, square_pairs, train_step

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 5


def measure(args: argparse.Namespace, bf16: bool) -> dict:
    import torch

    from peftkit.accel import StepSpeedups
    from peftkit.accel.frozen import FrozenProduct, can_pack

    model, task, params, optimizer, lengths, batches = lora_job(args)
    rows_of = [len(idx) * max(lengths[i] for i in idx) for idx in batches]  # padded tokens per batch
    shortest = sorted(range(len(lengths)), key=lengths.__getitem__)[:2]
    dtype = torch.bfloat16 if bf16 else torch.float32
    linears = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}." and "lora_" not in name
    ]
    # the products the steps take (prepacked where oneDNN can), each layer's own
    products = [FrozenProduct.of(m, dtype, pack=can_pack(dtype)) for m in linears]
    # random inputs and output gradients for every padded batch shape, made before any timing;
    # layers of the same width share them, as a step's activations are hot in cache too
    shapes = [tuple(m.weight.shape) for m in linears]  # (out, in)
    widths = {n for shape in shapes for n in shape}
    inputs = {rows: {n: torch.randn(rows, n, dtype=dtype) for n in widths} for rows in set(rows_of)}

    frozen = StepSpeedups(model, dtype)

    def step(b: int) -> None:
        train_step(model, task, params, optimizer, batches[b], frozen, bf16)

    def multiplies(b: int) -> None:
        rows = inputs[rows_of[b]]
        for product, (out_f, in_f) in zip(products, shapes, strict=True):
            product.forward(rows[in_f])
            product.input_grad(rows[out_f])  # a frozen weight needs no gradient of its own

    parts = {
        "steps": step,
        "multiplies": multiplies,
        "fixed": lambda b: train_step(model, task, params, optimizer, shortest, frozen, bf16),
    }
    pairs = square_pairs("bfloat16" if bf16 else "float32", (1024, 2048))
    probes = []
    model.train()
    for b in range(min(3, len(batches))):  # warm-up, not counted
        for run in parts.values():
            run(b)
    seconds = dict.fromkeys(parts, 0.0)
    for start in range(0, len(batches), CHUNK):
        names = list(parts) if (start // CHUNK) % 2 == 0 else list(parts)[::-1]
        for name in names:
            began = time.perf_counter()
            for b in range(start, min(start + CHUNK, len(batches))):
                parts[name](b)
            seconds[name] += time.perf_counter() - began
        probes.append(best_multiply(pairs, 2))
    return {
        "seconds": seconds,
        "peak": statistics.median(probes),
        "steps": len(batches),
        "real_tokens": sum(lengths),
        "padded_tokens": sum(rows_of),
        "linear_params": sum(m.weight.numel() for m in linears),
        "layers": len(linears),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_options(p)
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-step-budget.md"))
    args = p.parse_args()
    if not Path(args.data).exists():
        print(f"step_budget.py: no data at {args.data}; pass --data", file=sys.stderr)
        return 2
    from peftkit.precision import native_bf16

    precisions = [False] + ([True] if native_bf16() else [])
    results = {bf16: measure(args, bf16) for bf16 in precisions}
    first = results[False]
    lines = [
        "# Where a LoRA training step's time goes (MiniLM, LoRA r=8 on query/value, batch 32)",
        "",
        *header("step_budget.py"),
        f"- one epoch: {first['steps']} length-grouped steps, {first['real_tokens']:,} real and "
        f"{first['padded_tokens']:,} padded tokens, max length {args.max_length}",
        f"- multiplies alone: the {first['layers']} frozen linear layers of the encoder "
        f"({first['linear_params']:,} weights), forward and input gradient at each batch's padded shape",
        "- fixed cost: as many steps on a batch of the two shortest examples",
        f"- each part ran in chunks of {CHUNK} batches, in turn (one precision after the other); after "
        "each chunk a matmul probe (the best of 2 multiplies of 1024 and 2048 squares), whose median is the peak",
        "- ceiling: the useful-FLOP utilisation (4 FLOPs per frozen weight per real token, as `bench/speed.py` "
        "counts it less the small LoRA terms) a step would reach if it were nothing but these multiplies",
        "",
        "| precision | steps (s) | multiplies alone (s) | share of the step | their GFLOP/s | peak GFLOP/s "
        "| ceiling | fixed cost (s) | share of the step | the rest (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bf16, res in results.items():
        sec = res["seconds"]
        flops = 4 * res["linear_params"] * res["padded_tokens"]
        rest = sec["steps"] - sec["multiplies"] - sec["fixed"]
        rate = flops / sec["multiplies"]
        ceiling = rate * res["real_tokens"] / res["padded_tokens"] / res["peak"]
        lines.append(
            f"| {'bf16 autocast' if bf16 else 'float32'} | {sec['steps']:.3g} | {sec['multiplies']:.3g} | "
            f"{sec['multiplies'] / sec['steps']:.1%} | {rate / 1e9:.3g} | {res['peak'] / 1e9:.0f} | "
            f"{ceiling:.1%} | {sec['fixed']:.3g} | {sec['fixed'] / sec['steps']:.1%} | {rest:.3g} |"
        )
    lines += [
        "",
        "The rest (steps less the multiplies and the fixed cost) is what grows with the tokens besides the "
        "frozen layers' multiplies: dropout masks, attention, GELU, LayerNorm, casts and the LoRA products. It "
        "is a lower bound: the two-example steps of the fixed cost multiply by every weight too, time the "
        "multiplies column also holds.",
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
