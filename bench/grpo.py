"""Benchmark: a GRPO job in peftkit against TRL's GRPOTrainer (peft LoRA, transformers' generate, no
vLLM), and the memory of recipe (b) with its reward model on the policy's base or on a base of its
own. (The in-loop decoder against llama.cpp: ``bench/decode.py``.)

1. The same job three times, each in a process of its own: peftkit (its defaults here: bf16
   autocast, the speed layer, sampling through merged prepared products), peftkit in float32
   (``train.mixed_precision=no``) and TRL 1.16 (float32: its CPU default). SmolLM2-135M-Instruct,
   LoRA r=16 on every linear layer, the starts of Rotten Tomatoes reviews as prompts
   (recipes/review_starts.py), ``--prompts`` prompts x ``--generations`` completions of up to
   ``--length`` tokens per step, temperature 1, loss dapo, beta 0, ``--steps`` steps; the reward
   counts a completion's words (cheap, so the split shows the generation and the update). Per
   step after the first: time and its split (generation, reward, update = the rest), tokens
   generated per second of generation; peak RSS (VmHWM) of the process.
2. Recipe (b) for ``--memory-steps`` steps, the reward classifier (``--classifier``) on the
   policy's base and then on a base of its own: peak RSS of each process.
3. Recipe (b)'s result (``--review-adapter``, its trained adapter): the classifier's mean
   probability of "positive" for the greedy continuations of the held-out (test) review starts,
   by the base (the adapter off) and by the adapter.

    .venv/bin/python bench/grpo.py --classifier runs/smollm2-sentiment-classifier/adapter \\
        --review-adapter runs/smollm2-review-grpo/adapter    # writes bench/RESULTS-grpo.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "runs" / "review-starts"


def words(completions, **_):
    """The reward of the timing job: the completion's word count over 10."""
    return [len(c.split()) / 10 for c in completions]


def vm_hwm() -> int:
    """This process's peak resident memory in bytes (VmHWM: its own, not a parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _peftkit_recipe(args, out: Path, precision: str) -> Path:
    import yaml

    body = {
        "task": "grpo",
        "model": "smollm2-135m",
        "dataset": str(PROMPTS),
        "output_dir": str(out),
        "overwrite": True,
        "seed": 0,
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"chat_template": False, "max_length": 32, "max_eval_samples": 4, "test_split": None},
        "grpo": {
            "num_generations": args.generations,
            "max_completion_length": args.length,
            "temperature": 1.0,
            "log_completions_steps": 1000,
        },
        "rewards": [{"function": f"{Path(__file__).resolve()}:words"}],
        "train": {
            "max_steps": args.steps,
            "batch_size": args.prompts,
            "lr": 1e-5,
            "warmup_ratio": 0.0,
            "log_steps": 1,
            "eval_steps": 10_000,
            "mixed_precision": precision,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def part_peftkit(args) -> dict:
    from peftkit import load_recipe
    from peftkit.train import train

    precision = "auto" if args.part == "peftkit" else "no"
    out = Path(args.work) / args.part
    train(load_recipe(_peftkit_recipe(args, out, precision)))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "train"][1:]  # the first step warms up
    mean = lambda k: sum(r[k] for r in steps) / len(steps)  # noqa: E731
    return {
        "step": mean("step_seconds"),
        "generate": mean("generate_seconds"),
        "reward": mean("reward_seconds"),
        "tokens_per_s": sum(r["tokens_generated"] for r in steps) / sum(r["generate_seconds"] for r in steps),
        "completion_length": mean("completion_length"),
        "peak_rss": vm_hwm(),
    }


def part_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from peftkit.assets import resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    prompts = [json.loads(x)["prompt"] for x in (PROMPTS / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": p} for p in prompts[: args.prompts * args.steps]])
    spent = {"generate": [], "reward": [], "tokens": [], "step": []}

    def reward(completions, completion_ids, **kwargs):
        began = time.perf_counter()
        out = words(completions)
        spent["tokens"].append(sum(len(c) for c in completion_ids))
        spent["reward"].append(time.perf_counter() - began)
        return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            spent["step"].append(time.perf_counter() - self.began)

    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl"),
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.length,
        temperature=1.0,
        learning_rate=1e-5,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora,
        callbacks=[Clock()],
    )
    inner = trainer.model
    original = inner.generate

    def timed(*a, **k):
        began = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent["generate"].append(time.perf_counter() - began)

    inner.generate = timed
    trainer.train()
    skip = lambda k: spent[k][1:]  # noqa: E731
    n = len(skip("step"))
    return {
        "step": sum(skip("step")) / n,
        "generate": sum(skip("generate")) / n,
        "reward": sum(skip("reward")) / n,
        "tokens_per_s": sum(skip("tokens")) / sum(skip("generate")),
        "completion_length": sum(skip("tokens")) / n / (args.prompts * args.generations),
        "peak_rss": vm_hwm(),
    }


def part_memory(args) -> dict:
    from peftkit import load_recipe
    from peftkit.train import train

    share = args.part == "memory-shared"
    out = Path(args.work) / args.part
    cfg = load_recipe(
        str(ROOT / "recipes" / "smollm2-review-grpo.yaml"),
        [
            f"output_dir={out}",
            "overwrite=true",
            f"train.max_steps={args.memory_steps}",
            "data.max_eval_samples=8",
            "train.eval_steps=10000",
        ],
    )
    cfg.rewards = [cfg.rewards[0].model_copy(update={"adapter": args.classifier, "share_base": share})]
    summary = train(cfg)
    return {"peak_rss": vm_hwm(), "reward": summary["validation"]["reward"]}


def part_review(args) -> dict:
    import contextlib

    import torch

    from peftkit import load_recipe
    from peftkit.methods.base import adapters_disabled
    from peftkit.prepare import prepare

    out = {}
    for name, extra in (("base", []), ("adapter", [f"train.init_adapter={args.review_adapter}"])):
        cfg = load_recipe(str(ROOT / "recipes" / "smollm2-review-grpo.yaml"), [*extra, "data.max_eval_samples=128"])
        cfg.rewards = [cfg.rewards[0].model_copy(update={"adapter": args.classifier})]
        prep = prepare(cfg)
        prep.model.eval()
        with adapters_disabled(prep.model) if name == "base" else contextlib.nullcontext():
            metrics = prep.task.evaluate(prep.model, "test", 64, torch.device("cpu"), final=True)
        out[name] = {"reward": metrics["reward"], "n": metrics["n"], "sample": metrics["completions_sample"][:3]}
    return out


PARTS = {
    "review": part_review,
    "peftkit": part_peftkit,
    "peftkit-fp32": part_peftkit,
    "trl": part_trl,
    "memory-shared": part_memory,
    "memory-separate": part_memory,
}


def child(args, part: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--part", part],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    if done.returncode != 0:
        raise SystemExit(f"{part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classifier", help="recipe (b)'s reward classifier adapter (section 2)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--review-adapter", help="recipe (b)'s trained adapter (section 3)")
    parser.add_argument("--work", default="/tmp/peftkit-bench-grpo")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-grpo.md"))
    parser.add_argument("--part", choices=sorted(PARTS))
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if not (PROMPTS / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "recipes" / "review_starts.py")], check=True, cwd=ROOT)
    jobs = {name: child(args, name) for name in ("peftkit", "peftkit-fp32", "trl")}
    memory = {name: child(args, name) for name in ("memory-shared", "memory-separate")} if args.classifier else {}
    review = child(args, "review") if args.review_adapter and args.classifier else None
    trl = jobs["trl"]
    lines = [
        "# GRPO: peftkit against TRL's GRPOTrainer; recipe (b)'s memory and result",
        "",
        *header("grpo.py"),
        f"- job: SmolLM2-135M-Instruct, LoRA r=16 on every linear layer, {args.prompts} prompts x "
        f"{args.generations} completions of up to {args.length} tokens per step (starts of Rotten Tomatoes "
        f"reviews), temperature 1, loss dapo, beta 0, {args.steps} steps; times are means over steps 2-{args.steps}",
        "",
        "| trainer | time per step (s) | generation (s) | reward (s) | update (s) | tokens generated per s "
        "| mean completion length | peak RSS (MiB) | step time / TRL's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "peftkit": "peftkit (bf16 autocast, speed layer: its defaults here)",
        "peftkit-fp32": "peftkit, float32 (train.mixed_precision=no)",
        "trl": "TRL 1.16 GRPOTrainer + peft LoRA, float32 (transformers generate)",
    }
    for name, r in jobs.items():
        update = r["step"] - r["generate"] - r["reward"]
        lines.append(
            f"| {names[name]} | {r['step']:.2f} | {r['generate']:.2f} | {r['reward']:.4f} | {update:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['completion_length']:.1f} | {r['peak_rss'] / 2**20:.0f} "
            f"| {r['step'] / trl['step']:.2f} |"
        )
    lines += ["", "Decoding speed, the in-loop decoder against llama.cpp: bench/decode.py (RESULTS-decode.md)."]
    if memory:
        shared, separate = memory["memory-shared"], memory["memory-separate"]
        lines += [
            "",
            f"## Recipe (b): policy, reference and reward model on one base ({args.memory_steps} steps)",
            "",
            "| reward classifier | peak RSS (MiB) |",
            "|---|---|",
            f"| on the policy's base (a frozen named adapter) | {shared['peak_rss'] / 2**20:.0f} |",
            f"| on a base of its own (rewards[0].share_base: false) | {separate['peak_rss'] / 2**20:.0f} |",
            "",
            f"One base saves {(separate['peak_rss'] - shared['peak_rss']) / 2**20:.0f} MiB.",
        ]
    if review:
        lines += [
            "",
            "## Recipe (b): how positive the continuations read, before and after",
            "",
            f'The reward classifier\'s mean probability of "positive" for the greedy continuation of each of the '
            f"{review['base']['n']} held-out review starts (recipes/smollm2-review-grpo.yaml's test split), the "
            f"prompt and continuation scored together.",
            "",
            "| policy | mean P(positive) | sample continuations |",
            "|---|---|---|",
            f"| the base (adapter off) | {review['base']['reward']:.4f} | {review['base']['sample']} |",
            f"| {args.review_adapter} | {review['adapter']['reward']:.4f} | {review['adapter']['sample']} |",
        ]
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
