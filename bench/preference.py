"""Benchmark: DPO of SmolLM2-135M-Instruct on HH-RLHF harmlessness pairs, peftkit against TRL.

Both train the same LoRA (recipes/smollm2-hh-dpo.yaml's r, alpha and targets) on the same pairs,
batch, steps, learning rate and seed, each on its defaults otherwise, each in its own process:

* peftkit: ``peftkit train recipes/smollm2-hh-dpo.yaml`` (bf16 autocast, the CPU speed layer, the
  base with the adapter off as the reference);
* TRL: ``DPOTrainer`` with a peft ``LoraConfig``, ``bf16=True`` (autocast, as a CPU user sets it),
  ``use_cpu=True``, the base with the adapter off as the reference too;
* SFT: ``peftkit train`` with task causal_lm on the same sequences (each pair's prompt with its chosen
  and with its rejected answer: the 2 x batch sequences a DPO step's policy pass runs), the memory
  yardstick: a DPO run that held a second model copy would need far more than it.

Held-out: every adapter is scored by one evaluator, ``peftkit eval --preference dpo``'s (equal to
TRL's ``DPOTrainer.evaluate`` to 1e-4: tests/test_preference_trl.py), on all 288 test pairs, under
bf16 autocast, against the base's log-probabilities computed once (``precompute_reference``).
Train time excludes evaluation: peftkit's ``train_seconds - eval_seconds``, TRL's ``train_runtime``
(it is given no evaluation split). Peak RSS is each training process's own (``ru_maxrss``).

    .venv/bin/python bench/preference.py                  # writes bench/RESULTS-preference.md
    .venv/bin/python bench/preference.py --pairs 16 --seeds 1 --test 16   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-hh-dpo.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
WORK = ROOT / "runs" / "bench-preference"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}

TRL_CHILD = r"""
import json, resource, sys
import torch, yaml
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from peftkit.assets import resolve_model
from peftkit.models import load_tokenizer

opts = json.loads(sys.argv[1])
recipe = yaml.safe_load(open(opts["recipe"]))
m, t = recipe["method"], recipe["train"]
torch.manual_seed(opts["seed"])
model = AutoModelForCausalLM.from_pretrained(resolve_model(recipe["model"]))
tok = load_tokenizer(recipe["model"])
lora = LoraConfig(task_type="CAUSAL_LM", r=m["r"], lora_alpha=m["alpha"], lora_dropout=m["dropout"],
                  target_modules=m["target_modules"])
args = DPOConfig(output_dir=opts["out"], bf16=True, use_cpu=True, report_to=[], seed=opts["seed"],
                 per_device_train_batch_size=opts["batch"], num_train_epochs=1, learning_rate=t["lr"],
                 warmup_steps=t["warmup_ratio"], beta=recipe["preference"]["beta"], max_length=opts["max_length"],
                 logging_steps=opts["log"], save_strategy="no", dataloader_num_workers=0)
train = load_dataset("json", data_files=opts["train"], split="train")
trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=lora)
result = trainer.train()
trainer.model.save_pretrained(opts["out"] + "/adapter")
print("RESULT " + json.dumps({"train_seconds": result.metrics["train_runtime"],
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def sample_pairs(n: int, seed: int) -> list[dict]:
    with gzip.open(DATA / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return random.Random(seed).sample(rows, n)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd: list[str]) -> str:
    print("$", " ".join(str(c) for c in cmd[1:])[:300], flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def peftkit_run(name: str, data: Path, seed: int, opts: argparse.Namespace, *extra: str) -> dict:
    out = WORK / name
    run(
        [
            sys.executable, "-m", "peftkit", "train", str(RECIPE), f"dataset={data}", f"output_dir={out}",
            "overwrite=true", f"seed={seed}", f"data.max_length={opts.max_length}", "data.max_train_samples=null",
            "data.max_eval_samples=null", f"train.batch_size={opts.batch}", "train.eval_steps=null",
            f"train.log_steps={opts.log}", *extra,
        ]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    summary["train_only_seconds"] = summary["train_seconds"] - summary["eval_seconds"]
    summary["adapter"] = str(out / "adapter")
    return summary


def trl_run(name: str, train: Path, seed: int, opts: argparse.Namespace) -> dict:
    out = WORK / name
    child = {
        "recipe": str(RECIPE), "seed": seed, "out": str(out), "train": str(train), "batch": opts.batch,
        "max_length": opts.max_length, "log": opts.log,
    }  # fmt: skip
    stdout = run([sys.executable, "-c", TRL_CHILD, json.dumps(child)])
    result = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:])
    result["train_only_seconds"] = result["train_seconds"]
    result["adapter"] = str(out / "adapter")
    return result


def held_out(adapter: str, opts: argparse.Namespace) -> dict:
    from peftkit.config import PreferenceConfig
    from peftkit.multi import evaluate_preference

    cfg = PreferenceConfig(loss="dpo", beta=0.1, precompute_reference=True)
    return evaluate_preference(
        adapter,
        str(DATA),
        cfg,
        split="test",
        model="smollm2-135m",
        batch_size=8,
        max_length=opts.max_length,
        max_samples=opts.test,
        bf16=True,
    )


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (sampled from the train split)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--test", type=int, default=None, help="test pairs (default: all 288)")
    parser.add_argument("--log", type=int, default=1)
    opts = parser.parse_args()
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    rows: dict[str, list[dict]] = {"peftkit": [], "TRL": []}
    sft = None
    for seed in range(opts.seeds):
        pairs = sample_pairs(opts.pairs + 8, seed)
        folder = WORK / f"data-{seed}"
        train = write_rows(folder / "train.jsonl", pairs[: opts.pairs])
        write_rows(folder / "validation.jsonl", pairs[opts.pairs :])  # peftkit's end-of-epoch evaluation
        ours = peftkit_run(f"peftkit-{seed}", folder, seed, opts)
        theirs = trl_run(f"trl-{seed}", train, seed, opts)
        if sft is None:  # the memory yardstick: the same sequences, next-token loss
            chat = [{"messages": p["prompt"] + p[side]} for p in pairs[: opts.pairs] for side in ("chosen", "rejected")]
            sft_folder = WORK / "data-sft"
            write_rows(sft_folder / "train.jsonl", chat)
            write_rows(sft_folder / "validation.jsonl", chat[:8])
            sft = peftkit_run("sft", sft_folder, seed, opts, "task=causal_lm", f"train.batch_size={2 * opts.batch}")
        for name, result in (("peftkit", ours), ("TRL", theirs)):
            result["test"] = held_out(result["adapter"], opts)
            rows[name].append(result)
            print(
                name, seed, {k: result["test"][k] for k in ("n", "rewards/accuracies", "rewards/margins")}, flush=True
            )
    assert sft is not None
    n_test = rows["peftkit"][0]["test"]["n"]
    mib = 1024 * 1024
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    m, t = recipe["method"], recipe["train"]
    lora = f"LoRA r {m['r']}, alpha {m['alpha']}, {m['target_modules']}; lr {t['lr']}, warmup {t['warmup_ratio']}"
    lines = [
        "# DPO of SmolLM2-135M-Instruct on HH-RLHF harmlessness pairs: peftkit vs TRL",
        "",
        *header("preference.py"),
        f"- setup: {opts.pairs} training pairs per seed (sampled from the train split with the seed), batch "
        f"{opts.batch} pairs, 1 epoch ({-(-opts.pairs // opts.batch)} steps), max_length {opts.max_length}, {lora} "
        "(recipes/smollm2-hh-dpo.yaml), beta 0.1, the base (adapter off) as reference; seeds "
        f"{', '.join(map(str, range(opts.seeds)))}",
        f"- held-out: {n_test} test pairs (pairs whose prompt alone fills max_length are left out by both, as TRL "
        "does), one evaluator for both adapters (peftkit's, equal to TRL's evaluate), bf16 autocast",
        "",
        "| trainer | held-out rewards/accuracies | held-out rewards/margins | train time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, results in rows.items():
        acc = [r["test"]["rewards/accuracies"] for r in results]
        margins = [r["test"]["rewards/margins"] for r in results]
        times = [r["train_only_seconds"] for r in results]
        rss = [r["peak_rss_bytes"] / mib for r in results]
        lines.append(f"| {name} | {spread(acc)} | {spread(margins)} | {statistics.mean(times):.0f} | {max(rss):.0f} |")
    lines.append(
        f"| SFT (peftkit, same sequences) | | | {sft['train_only_seconds']:.0f} | {sft['peak_rss_bytes'] / mib:.0f} |"
    )
    t_ratio = statistics.mean(r["train_only_seconds"] for r in rows["peftkit"]) / statistics.mean(
        r["train_only_seconds"] for r in rows["TRL"]
    )
    ours_rss = max(r["peak_rss_bytes"] for r in rows["peftkit"])
    lines += [
        "",
        f"- train time, peftkit / TRL: {t_ratio:.2f} (target ≤ 0.5)",
        f"- peak RSS, peftkit / TRL: {ours_rss / max(r['peak_rss_bytes'] for r in rows['TRL']):.2f} (target ≤ 1); "
        f"peftkit DPO / peftkit SFT: {ours_rss / sft['peak_rss_bytes']:.2f} (target ≤ 1.2)",
        "- per seed (accuracy, margin, train s): "
        + "; ".join(
            f"{name} {i}: {r['test']['rewards/accuracies']:.4f}, {r['test']['rewards/margins']:.4f}, "
            f"{r['train_only_seconds']:.0f}"
            for name, results in rows.items()
            for i, r in enumerate(results)
        ),
    ]
    write_report(ROOT / "bench" / "RESULTS-preference.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
