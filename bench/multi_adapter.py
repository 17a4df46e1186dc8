"""Mixed-adapter inference: K LoRA adapters with their own heads on one MiniLM, every batch's rows
spread evenly across them.

Examples/s of (a) peftkit's mixed batch (one forward, gathered low-rank products, heads per row
group), (b) one forward per adapter over its rows of the batch, (c) peft's ``adapter_names=``
mixed batch, (d) the bare base; and the memory each added adapter takes. The adapters are made
by peft (random factors and heads), saved in its multi-adapter layout, and loaded from there by
peftkit, so both libraries serve the same adapters; their probabilities are compared too.

    .venv/bin/python bench/multi_adapter.py            # writes bench/RESULTS-multi-adapter.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _shared import header, write_report  # noqa: E402

TARGETS = ["query", "value"]


def texts(n: int) -> list[str]:
    from peftkit.assets import load_rotten_tomatoes

    return load_rotten_tomatoes()["test"]["text"][:n]


def make_adapters(base, k: int, rank: int, folder: Path):
    """A peft model with adapters a0..a{k-1} (random LoRA factors and heads), saved to ``folder``."""
    import peft

    cfg = dict(task_type=peft.TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, k):
        ref.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(k * 100 + rank)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(str(folder))
    return ref.eval()


def load_ours(base, folder: Path):
    from peftkit.methods.named import NamedAdapters
    from peftkit.multi import folder_adapters, read_specs

    _, _, loaded = read_specs(folder_adapters(folder), model="minilm")
    named = NamedAdapters(copy.deepcopy(base))
    for name, item in loaded.items():
        named.add(name, item.files.method_config(), item.state)
    named.model.eval()
    return named


def adapter_bytes(named, name: str) -> int:
    """The bytes one adapter adds: its LoRA factors on every layer and its head's copy."""
    from peftkit.methods.layer import AdaptedLinear
    from peftkit.methods.named import HeadBank

    total = 0
    for module in named.model.modules():
        if isinstance(module, AdaptedLinear) and name in module.updates:
            total += sum(t.numel() * t.element_size() for t in module.updates[name].parameters())
        elif isinstance(module, HeadBank) and name in module.copies:
            total += sum(p.numel() * p.element_size() for p in module.copies[name].parameters())
    return total


def timed(fn, batches) -> float:
    began = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - began


def run(k: int, rank: int, base, batches, rounds: int, work: Path) -> dict:
    ref = make_adapters(base, k, rank, work / f"k{k}-r{rank}")
    named = load_ours(base, work / f"k{k}-r{rank}")
    names = [f"a{i}" for i in range(k)]

    def rows(b):
        return [names[i % k] for i in range(b["input_ids"].shape[0])]

    def mixed(b):
        with named.per_row(rows(b)):
            return named.model(**b).logits

    def per_adapter(b):
        out = []
        for i, name in enumerate(names):
            idx = torch.arange(i, b["input_ids"].shape[0], k)
            with named.using(name):
                out.append(named.model(**{key: v[idx] for key, v in b.items()}).logits)
        return out

    def peft_mixed(b):
        return ref(**b, adapter_names=rows(b)).logits

    def bare(b):
        return base(**b).logits

    variants = {
        "peftkit mixed": mixed,
        "one pass per adapter": per_adapter,
        "peft adapter_names": peft_mixed,
        "bare base": bare,
    }
    with torch.inference_mode():
        worst = max(float((mixed(b).softmax(-1) - peft_mixed(b).softmax(-1)).abs().max()) for b in batches)
        for fn in variants.values():  # warm-up
            fn(batches[0])
        seconds = {v: [] for v in variants}
        for _ in range(rounds):
            for v, fn in variants.items():
                seconds[v].append(timed(fn, batches))
    n = sum(b["input_ids"].shape[0] for b in batches)
    speed = {v: n / statistics.median(s) for v, s in seconds.items()}
    return {
        "k": k,
        "rank": rank,
        "speed": speed,
        "max_prob_diff": worst,
        "bytes": statistics.mean(adapter_bytes(named, x) for x in names),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8, help="batches of --batch-size rows per timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--counts", default="1,4,16")
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-multi-adapter.md"))
    args = p.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.assets import resolve_model
    from peftkit.models import quiet_transformers

    quiet_transformers()
    path = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    corpus = sorted(texts(args.batches * args.batch_size), key=len)
    batches = [
        dict(tok(corpus[i : i + args.batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt"))
        for i in range(0, len(corpus), args.batch_size)
    ]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    results = []
    with tempfile.TemporaryDirectory() as work:
        for rank in [int(r) for r in args.ranks.split(",")]:
            for k in [int(x) for x in args.counts.split(",")]:
                results.append(run(k, rank, base, batches, args.rounds, Path(work)))
                print(results[-1], flush=True)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    lines = [
        "# Mixed-adapter inference: K LoRA adapters with their own heads on MiniLM",
        "",
        *header("multi_adapter.py"),
        f"- job: {len(batches)} batches of {args.batch_size} Rotten Tomatoes test snippets (sorted by length; "
        f"{tokens:,} real tokens in {padded:,} padded positions), row i uses adapter i mod K; LoRA on "
        f"{', '.join(TARGETS)} (alpha 2r) and a 2-label head per adapter; float32, inference mode, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds",
        f"- memory: the base's tensors take {base_bytes / 2**20:.1f} MiB; an added adapter takes its LoRA "
        "factors and its head copy (nothing of the base is copied)",
        "",
        "| K | r | peftkit mixed (ex/s) | one pass per adapter | peft adapter_names | bare base | "
        "mixed / base | mixed / peft | MiB per adapter | max prob diff vs peft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["speed"]
        lines.append(
            f"| {r['k']} | {r['rank']} | {s['peftkit mixed']:.0f} | {s['one pass per adapter']:.0f} | "
            f"{s['peft adapter_names']:.0f} | {s['bare base']:.0f} | "
            f"{s['peftkit mixed'] / s['bare base']:.2f} | {s['peftkit mixed'] / s['peft adapter_names']:.2f} | "
            f"{r['bytes'] / 2**20:.3f} | {r['max_prob_diff']:.1e} |"
        )
    at16 = [r for r in results if r["k"] == 16]
    if at16:
        lines += ["", "Targets at K = 16: mixed >= 0.8x the bare base and >= 1.5x peft's mixed batch."]
        for r in at16:
            s = r["speed"]
            base_ok = s["peftkit mixed"] / s["bare base"] >= 0.8
            peft_ok = s["peftkit mixed"] / s["peft adapter_names"] >= 1.5
            lines.append(
                f"- r {r['rank']}: {s['peftkit mixed'] / s['bare base']:.2f}x base "
                f"({'met' if base_ok else 'missed'}), {s['peftkit mixed'] / s['peft adapter_names']:.2f}x "
                f"peft ({'met' if peft_ok else 'missed'})"
            )
    write_report(args.output, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
