"""Benchmark: GRPO recipe (a), SmolLM2-135M-Instruct answering Rotten Tomatoes reviews with exactly
"positive" or "negative", against the zero-shot model and an SFT adapter, on the same test reviews.

Every model answers the recipe's test split (its 300 reviews, the SFT recipe's too) greedily, and
each answer is scored by the recipe's reward, recipes/rewards.py:right_label (1 for the label word
and nothing else): its mean is the exact-match accuracy. ``says_a_label`` is the share of answers
that are a label word at all. Each model is asked as it was trained: the zero-shot model and the
GRPO adapter with the GRPO recipe's prompt, the SFT adapter with its own (its run's config).

    .venv/bin/python bench/grpo_sentiment.py --grpo runs/smollm2-sentiment-grpo/adapter \\
        --sft runs/smollm2-sentiment-lora/adapter      # writes bench/RESULTS-grpo-sentiment.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-sentiment-grpo.yaml"


def scored(overrides: list[str], disabled: bool = False) -> dict:
    """The recipe's test split answered greedily by the model ``overrides`` make (its adapter
    via train.init_adapter), or the base alone (``disabled``), and the rewards' means."""
    import contextlib

    import torch

    from peftkit.config import RewardSource, load_recipe
    from peftkit.methods.base import adapters_disabled
    from peftkit.prepare import prepare

    cfg = load_recipe(str(RECIPE), overrides)
    cfg.rewards = [
        RewardSource(function=f"{ROOT / 'recipes' / 'rewards.py'}:right_label"),
        RewardSource(function=f"{ROOT / 'recipes' / 'rewards.py'}:says_a_label"),
    ]
    prep = prepare(cfg)
    prep.model.eval()
    with adapters_disabled(prep.model) if disabled else contextlib.nullcontext():
        metrics = prep.task.evaluate(prep.model, "test", 64, torch.device("cpu"), final=True)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpo", required=True, help="the GRPO recipe's adapter folder")
    parser.add_argument("--sft", help="an SFT adapter of recipes/smollm2-sentiment-lora.yaml")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-grpo-sentiment.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [("zero-shot base (GRPO recipe's prompt)", scored([], disabled=True))]
    if args.sft:
        sft_cfg = Path(args.sft).parent / "config.yaml"
        import yaml

        template = yaml.safe_load(sft_cfg.read_text())["data"]["prompt_template"] if sft_cfg.is_file() else None
        extra = [f"data.prompt_template={json.dumps(template)}"] if template else []
        rows.append((f"SFT adapter {args.sft} (its own prompt)", scored([f"train.init_adapter={args.sft}", *extra])))
    rows.append((f"GRPO adapter {args.grpo}", scored([f"train.init_adapter={args.grpo}"])))
    summary = json.loads((Path(args.grpo).parent / "summary.json").read_text())
    lines = [
        "# GRPO recipe (a): SmolLM2-135M-Instruct answers Rotten Tomatoes reviews with one label word",
        "",
        *header("grpo_sentiment.py"),
        f"- recipe: recipes/smollm2-sentiment-grpo.yaml ({summary['steps']} steps, train time "
        f"{summary['train_seconds']:.0f} s, peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB)",
        "",
        "| model | test n | exact match (reward right_label) | answers that are a label word | sample answers |",
        "|---|---|---|---|---|",
    ]
    for name, m in rows:
        sample = [s["completion"] for s in m.get("completions_sample", [])[:3]]
        lines.append(
            f"| {name} | {m['n']} | {m['rewards/right_label/mean']:.4f} | {m['rewards/says_a_label/mean']:.4f} "
            f"| {sample} |"
        )
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
