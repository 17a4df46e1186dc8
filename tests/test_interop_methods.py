"""IA3, prompt tuning and prefix tuning cross between peftkit and peft with the same logits."""

from __future__ import annotations

import pytest

from peftkit import apply_method, load_adapter, save_adapter
from peftkit.methods import IA3Config, PrefixTuningConfig, PromptTuningConfig, trainable_parameters

from .test_interop_peft import logits, perturb
from .test_methods import build

peft = pytest.importorskip("peft")


def peft_config(method: str, task: str, family: str):
    task_type = {"cls": peft.TaskType.SEQ_CLS, "clm": peft.TaskType.CAUSAL_LM}[task]
    if family == "distilbert":  # peft cannot read DistilBERT's config names (dim, n_layers)
        return peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=4, token_dim=32, num_layers=2, num_attention_heads=2
        )
    if method == "ia3":
        return peft.IA3Config(task_type=task_type)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=4)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4)
    if method == "prefix-projection":
        return peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
        )
    raise ValueError(method)


def ours_config(method: str):
    return {
        "ia3": IA3Config(),
        "prompt": PromptTuningConfig(num_virtual_tokens=4),
        "prefix": PrefixTuningConfig(num_virtual_tokens=4),
        "prefix-projection": PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
    }[method]


CASES = [
    ("ia3", "bert"),
    ("ia3", "llama"),
    ("ia3", "gpt2"),
    ("prompt", "bert"),
    ("prompt", "distilbert"),
    ("prompt", "llama"),
    ("prompt", "gpt2"),
    ("prefix", "llama"),
    ("prefix", "qwen2"),
    ("prefix", "gpt2"),
    ("prefix-projection", "llama"),
]


@pytest.mark.parametrize(("method", "family"), CASES)
def test_peftkit_adapter_loads_in_peft(method, family, tmp_path):
    ours = build(family)
    apply_method(ours, ours_config(method))
    perturb(trainable_parameters(ours).values(), seed=3)
    expected = logits(ours)
    save_adapter(
        ours,
        tmp_path / "a",
        base_model="tiny",
        task="classification" if family in ("bert", "distilbert") else "causal_lm",
    )
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "a")
    got = logits(theirs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("method", "family"), CASES)
def test_peft_adapter_loads_in_peftkit(method, family, tmp_path):
    task = "cls" if family in ("bert", "distilbert") else "clm"
    theirs = peft.get_peft_model(build(family), peft_config(method, task, family))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=3)
    theirs.save_pretrained(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "a")  # inference form
    expected = logits(theirs)
    ours = build(family)
    load_adapter(ours, tmp_path / "a")
    got = logits(ours)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
