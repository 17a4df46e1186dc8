"""Benchmark: SmolLM2-135M-Instruct on Rotten Tomatoes phrased as an instruction, zero-shot vs LoRA.

1. Zero-shot: the packaged base, no adapter, on the recipe's test reviews: label scoring (the
   next-token scores of "positive" and "negative" after the chat-templated question) and exact
   match of the greedy answer.
2. LoRA: ``peftkit train recipes/smollm2-sentiment-lora.yaml`` in its own process; the same two
   measures on the same test reviews, train time and peak memory from its summary.json.

    .venv/bin/python bench/smollm2_sentiment.py            # writes bench/RESULTS-smollm2-sentiment.md
    .venv/bin/python bench/smollm2_sentiment.py train.epochs=0.1   # overrides go to both parts
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-sentiment-lora.yaml"


def zero_shot(overrides: list[str]) -> dict:
    from peftkit.causal import to_rows
    from peftkit.config import load_recipe
    from peftkit.data import load_splits
    from peftkit.models import load_causal_lm
    from peftkit.tasks import build_task

    cfg = load_recipe(RECIPE, overrides)
    splits = load_splits(cfg.dataset, cfg.data, cfg.seed, convert=to_rows)
    base = load_causal_lm(cfg.model)
    task = build_task(cfg, base.model, base.tokenizer, {"train": splits["train"], "test": splits["test"]})
    began = time.perf_counter()
    metrics = task.evaluate(base.model, "test", cfg.train.eval_batch_size, "cpu", final=True)
    metrics["eval_seconds"] = time.perf_counter() - began
    return metrics


def lora(overrides: list[str]) -> dict:
    out = ROOT / "runs" / "bench-smollm2-sentiment"
    cmd = [sys.executable, "-m", "peftkit", "train", str(RECIPE), f"output_dir={out}", "overwrite=true", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    overrides = sys.argv[1:]
    base = zero_shot(overrides)
    print("zero-shot:", {k: v for k, v in base.items() if k != "confusion_matrix"}, flush=True)
    run = lora(overrides)
    test = run["test"]
    rows = [("zero-shot base", base, None, None), ("LoRA (recipe)", test, run["train_seconds"], run["peak_rss_bytes"])]
    lines = [
        "# SmolLM2-135M-Instruct on Rotten Tomatoes as an instruction task: zero-shot vs LoRA",
        "",
        *header("smollm2_sentiment.py"),
        f"- recipe: recipes/smollm2-sentiment-lora.yaml (train examples {run['train_examples']}, "
        f"steps {run['steps']}, trainable parameters {run['trainable_params']:,})",
        "",
        "| model | test n | label-scoring accuracy | macro-F1 | exact match (greedy answer) "
        "| valid labels | train time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m, seconds, rss in rows:
        lines.append(
            f"| {name} | {m['n']} | {m['accuracy']:.4f} | {m['f1']:.4f} | {m['exact_match']:.4f} "
            f"| {m['valid_label_rate']:.4f} | {'' if seconds is None else f'{seconds:.0f}'} "
            f"| {'' if rss is None else f'{rss / 2**20:.0f}'} |"
        )
    gain = 100 * (test["accuracy"] - base["accuracy"])
    lines += [
        "",
        f"LoRA - zero-shot (label scoring): {gain:+.1f} points. Sample answers: "
        f"zero-shot {base['answers_sample'][:3]}, LoRA {test['answers_sample'][:3]}.",
    ]
    write_report(ROOT / "bench" / "RESULTS-smollm2-sentiment.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
