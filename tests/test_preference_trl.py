"""Preference losses, metrics and one optimizer step against TRL 1.16, the test-only oracle.

Same tiny LLaMA, same LoRA adapter (written by peftkit, loaded by peft on TRL's side), same
rows, same beta: every metric TRL's trainers report for the adapter equals peftkit's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peftkit.preference import PAIR_METRICS
from tests.conftest import make_lm_tokenizer, preference_rows, unpaired_rows, write_jsonl

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

N = 12  # rows; TRL's evaluation averages per-batch means, equal to ours when batches are equal
BATCH = 4
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA adapter with non-zero B factors (so the policy differs from its base)."""
    from peftkit.config import LoraConfig
    from peftkit.methods.base import apply_method
    from peftkit.methods.saving import save_adapter
    from peftkit.models import load_causal_lm

    base = load_causal_lm(str(tiny_llama_dir)).model
    apply_method(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("policy") / "adapter"
    save_adapter(base, out, base_model=str(tiny_llama_dir), task="causal_lm", meta={"max_length": MAX_LENGTH})
    return out


def _trl_policy(llama_dir: Path, adapter: Path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    return peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def _common(tmp_path: Path, **kw) -> dict:
    return dict(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        per_device_eval_batch_size=BATCH,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        **kw,
    )


def _ours(adapter: Path, rows: list[dict], tmp_path: Path, **options) -> dict:
    from peftkit.config import PreferenceConfig
    from peftkit.multi import evaluate_preference

    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return evaluate_preference(
        str(adapter), str(data), PreferenceConfig(**options), batch_size=BATCH, max_length=MAX_LENGTH
    )


def _close(ours: dict, theirs: dict, keys: list[str], tol: float = 1e-4) -> None:
    for key in keys:
        assert ours[key] == pytest.approx(theirs[f"eval_{key}"], abs=tol, rel=tol), key


PAIR_KEYS = ["loss", *PAIR_METRICS]


@pytest.mark.parametrize(
    "loss, trl_loss, chat",
    [("dpo", "sigmoid", True), ("dpo", "sigmoid", False), ("ipo", "ipo", True), ("hinge", "hinge", False)]
    + [("robust", "robust", True)],
)
def test_dpo_family_metrics_equal_trl(loss, trl_loss, chat, tiny_llama_dir, policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = preference_rows(N, chat)
    smoothing = 0.1 if loss == "robust" else 0.0
    ours = _ours(policy_dir, rows, tmp_path, loss=loss, beta=0.2, label_smoothing=smoothing)
    args = trl.DPOConfig(**_common(tmp_path, beta=0.2, loss_type=[trl_loss], label_smoothing=smoothing))
    trainer = trl.DPOTrainer(
        model=_trl_policy(tiny_llama_dir, policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=args,
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows),
        processing_class=make_lm_tokenizer(),
    )
    theirs = trainer.evaluate()
    assert ours["n"] == N and 0 < ours["rewards/accuracies"] < 1  # the adapter ranks some pairs each way
    _close(ours, theirs, PAIR_KEYS)


def _no_bos_tokenizer():
    """TRL's CPO and ORPO trainers put BOS before a prompt that lacks it; DPO's tokenization
    (peftkit's) does not. Without a BOS token both read the same ids."""
    tok = make_lm_tokenizer(chat_template=False)
    tok.bos_token = None
    return tok


def test_simpo_metrics_equal_trl_cpo(tiny_llama_dir, policy_dir, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    rows = preference_rows(N, chat=False)
    ours = _ours(policy_dir, rows, tmp_path, loss="simpo", beta=2.0, simpo_gamma=0.4)
    args = CPOConfig(**_common(tmp_path, beta=2.0, loss_type="simpo", simpo_gamma=0.4, cpo_alpha=0.0))
    trainer = CPOTrainer(
        model=_trl_policy(tiny_llama_dir, policy_dir),
        args=args,
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows),
        processing_class=_no_bos_tokenizer(),
    )
    theirs = trainer.evaluate()
    _close(ours, theirs, PAIR_KEYS)


def test_orpo_metrics_equal_trl(tiny_llama_dir, policy_dir, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = preference_rows(N, chat=False)
    ours = _ours(policy_dir, rows, tmp_path, loss="orpo", beta=0.1)
    trainer = ORPOTrainer(
        model=_trl_policy(tiny_llama_dir, policy_dir),
        args=ORPOConfig(**_common(tmp_path, beta=0.1)),
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows),
        processing_class=_no_bos_tokenizer(),
    )
    theirs = trainer.evaluate()
    _close(ours, theirs, PAIR_KEYS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])


def test_kto_metrics_equal_trl(tiny_llama_dir, policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = unpaired_rows(N)
    ours = _ours(policy_dir, rows, tmp_path, loss="kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    args = trl.KTOConfig(**_common(tmp_path, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5))
    trainer = trl.KTOTrainer(
        model=_trl_policy(tiny_llama_dir, policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=args,
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows),
        processing_class=make_lm_tokenizer(),
    )
    theirs = trainer.evaluate()
    assert ours["kl"] > 0  # the KL estimate is in play, not clamped away
    _close(ours, theirs, ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"])


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".default", ""): v.detach().clone()
        for k, v in model.named_parameters()
        if "lora_" in k and ".ref." not in k
    }


def test_one_dpo_step_moves_the_adapter_as_trl(tiny_llama_dir, policy_dir, tmp_path):
    """SFT then DPO: both start from the same adapter, which is also the reference (TRL's
    'ref' copy; peftkit's default for train.init_adapter), and take one AdamW step."""
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    rows = preference_rows(N, chat=True)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        write_jsonl(data / f"{split}.jsonl", rows)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        json.dumps(
            {
                "task": "preference",
                "model": str(tiny_llama_dir),
                "dataset": str(data),
                "output_dir": str(tmp_path / "run"),
                "preference": {"loss": "dpo", "beta": 0.3},
                "data": {"max_length": MAX_LENGTH},
                "train": {
                    "init_adapter": str(policy_dir),
                    "max_steps": 1,
                    "batch_size": N,
                    "lr": 1e-2,
                    "warmup_ratio": 0.0,
                    "mixed_precision": "no",
                },
            }
        )
    )
    done = run_cli("train", str(recipe))
    assert done.returncode == 0, done.stderr
    assert f"reference the adapter {policy_dir} (frozen)" in done.stdout
    ours = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")

    policy = _trl_policy(tiny_llama_dir, policy_dir)
    args = trl.DPOConfig(
        **{**_common(tmp_path, beta=0.3), "per_device_train_batch_size": N},
        learning_rate=1e-2,
        max_steps=1,
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    before = _lora_tensors(policy)
    trl.DPOTrainer(model=policy, args=args, train_dataset=_dataset(rows), processing_class=make_lm_tokenizer()).train()
    after = _lora_tensors(policy)
    moved = 0
    for key, value in after.items():
        theirs_key = key.replace("base_model.model.", "base_model.model.", 1)
        assert theirs_key in ours, key
        torch.testing.assert_close(ours[theirs_key], value, atol=1e-5, rtol=0)
        moved += int(not torch.equal(value, before[key]))
    assert moved == len(after)  # every factor took the step


def _reward_run(tiny_llama_dir: Path, tmp_path: Path, rows: list[dict], **train) -> Path:
    from tests.conftest import run_cli

    data = tmp_path / "rdata"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        write_jsonl(data / f"{split}.jsonl", rows)
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(
        json.dumps(
            {
                "task": "reward",
                "model": str(tiny_llama_dir),
                "dataset": str(data),
                "output_dir": str(tmp_path / "reward-run"),
                "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "data": {"max_length": MAX_LENGTH},
                "train": {"batch_size": BATCH, "lr": 5e-3, "warmup_ratio": 0.0, "mixed_precision": "no", **train},
            }
        )
    )
    done = run_cli("train", str(recipe))
    assert done.returncode == 0, done.stderr
    return tmp_path / "reward-run" / "adapter"


def _trl_reward_model(llama_dir: Path, adapter: Path):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1)
    base.config.pad_token_id = 0
    return peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def test_reward_model_metrics_equal_trl(tiny_llama_dir, tmp_path):
    from peftkit.multi import evaluate_each, load_named

    rows = preference_rows(N, chat=True)
    adapter = _reward_run(tiny_llama_dir, tmp_path, rows, max_steps=3)
    named = load_named([("r", adapter)])
    ours = evaluate_each(named, str(tmp_path / "rdata"), "validation", batch_size=BATCH)["adapters"]["r"]
    args = trl.RewardConfig(**{k: v for k, v in _common(tmp_path).items()})
    trainer = trl.RewardTrainer(
        model=_trl_reward_model(tiny_llama_dir, adapter),
        args=args,
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows),
        processing_class=make_lm_tokenizer(),
    )
    theirs = trainer.evaluate()
    assert ours["n"] == N and ours["margin"] != 0
    # (TRL's min_reward and max_reward are per-batch extremes averaged; peftkit's span the split)
    _close(ours, theirs, ["loss", "accuracy", "margin", "mean_reward"])
    assert ours["min_reward"] <= theirs["eval_min_reward"] <= theirs["eval_max_reward"] <= ours["max_reward"]


def test_one_reward_step_moves_the_adapter_as_trl(tiny_llama_dir, tmp_path):
    """From the same adapter (head included), one Bradley-Terry step on the same pairs."""
    from safetensors.torch import load_file

    rows = preference_rows(N, chat=False)
    start = _reward_run(tiny_llama_dir, tmp_path / "a", rows, max_steps=2)
    ours_dir = _reward_run(tiny_llama_dir, tmp_path / "b", rows, max_steps=1, batch_size=N, init_adapter=str(start))
    ours = load_file(ours_dir / "adapter_model.safetensors")
    model = _trl_reward_model(tiny_llama_dir, start)
    args = trl.RewardConfig(
        **{**_common(tmp_path), "per_device_train_batch_size": N},
        learning_rate=5e-3,
        max_steps=1,
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    trl.RewardTrainer(
        model=model, args=args, train_dataset=_dataset(rows), processing_class=make_lm_tokenizer()
    ).train()
    after = {
        k.replace(".default", "").replace(".modules_to_save", ""): v.detach()
        for k, v in model.named_parameters()
        if v.requires_grad
    }
    assert after and set(after) == set(ours)
    for key, value in after.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0)
