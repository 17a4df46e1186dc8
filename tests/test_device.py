"""Device-agnostic checks: every method, merging, saving and loading, peft parity, a quantized base
and a short training run, on the device ``PEFTKIT_TEST_DEVICE`` names (default: cpu).

CI runs them on the CPU; ``bench/gpu_check.py`` runs this same file with
``PEFTKIT_TEST_DEVICE=cuda`` on a machine with a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from peftkit import apply_method, load_adapter, merge, merge_and_unload, save_adapter, unmerge
from peftkit.methods import METHODS, trainable_parameters

from .conftest import METHOD_EXAMPLES, has_module, make_tokenizer, tiny_bert_config, tiny_recipe

DEVICE = os.environ.get("PEFTKIT_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"PEFTKIT_TEST_DEVICE={DEVICE} but no CUDA device is available", allow_module_level=True)

CONFIGS = METHOD_EXAMPLES  # one small config per registered method


def bert(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=2)).to(DEVICE)


def batch():
    tok = make_tokenizer()
    enc = tok(["the movie was great", "a dull and boring plot"], padding=True, return_tensors="pt")
    return {k: v.to(DEVICE) for k, v in enc.items()}


def randomize(model) -> None:
    """Non-zero updates everywhere (zero-initialised factors would hide a wrong merge)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_method_trains_on_the_device(name):
    model = bert()
    apply_method(model, CONFIGS[name])
    model.to(DEVICE).train()
    out = model(**batch(), labels=torch.tensor([1, 0], device=DEVICE))
    assert torch.isfinite(out.loss) and out.logits.device.type == torch.device(DEVICE).type
    out.loss.backward()
    trainable = trainable_parameters(model)
    assert trainable and all(p.grad is not None for p in trainable.values())
    # the method froze everything else: what trains is exactly what the method says trains
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.mergeable and n not in ("bitfit", "full")])
def test_merged_equals_unmerged_on_the_device(name):
    model = bert()
    apply_method(model, CONFIGS[name])
    randomize(model)
    model.eval()
    with torch.no_grad():
        before = model(**batch()).logits
        merge(model)
        merged = model(**batch()).logits
        unmerge(model)
        after = model(**batch()).logits
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lora", "prefix", "prompt", "ia3", "adapter"])
def test_save_then_load_gives_the_same_logits_on_the_device(name, tmp_path):
    model = bert()
    apply_method(model, CONFIGS[name])
    randomize(model)
    model.eval()
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = bert()
    load_adapter(fresh, tmp_path / "a")
    fresh.to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not has_module("peft"), reason="peft is not installed")
def test_peft_loads_a_peftkit_lora_adapter_with_the_same_logits_on_the_device(tmp_path):
    from peft import PeftModel

    model = bert()
    apply_method(model, METHODS["lora"].config(r=4, alpha=8, target_modules=["query", "value"]))
    randomize(model)
    model.eval()
    save_adapter(model, tmp_path / "a", base_model="tiny")
    theirs = PeftModel.from_pretrained(bert(), tmp_path / "a").to(DEVICE).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch()).logits, model(**batch()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not has_module("bitsandbytes"), reason="bitsandbytes is not installed")
def test_lora_on_an_nf4_base_trains_on_the_device():
    from peftkit.config import QuantizationConfig
    from peftkit.quantize import quantize_model

    model = bert()
    quantize_model(model, QuantizationConfig(bits=4, compute_dtype="bfloat16"), skip=["classifier"])
    apply_method(model, METHODS["lora"].config(r=4, alpha=8))
    model.to(DEVICE).train()
    out = model(**batch(), labels=torch.tensor([1, 0], device=DEVICE))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable_parameters(model).values())


def test_a_short_training_run_on_the_device(tmp_path, tiny_bert_dir, sentiment_dir):
    """``train`` on whatever device accelerate picks (the GPU where there is one); the speed layer
    is on only for CPU runs."""
    from peftkit import load_recipe
    from peftkit.train import train

    said = []
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.epochs": 2})
    summary = train(load_recipe(recipe), echo=said.append)
    assert summary["validation"]["accuracy"] > 0.8
    on_cpu = not torch.cuda.is_available()
    assert any(s.startswith("speed layer: frozen linear layers") for s in said) == on_cpu


def test_dpo_log_probabilities_and_a_short_run_on_the_device(tmp_path, tiny_llama_dir):
    """The answers' log-probabilities, policy and reference (the base with the adapter off), on
    the device equal the CPU's; a short DPO run trains on whatever device accelerate picks."""
    from peftkit import load_recipe
    from peftkit.config import LoraConfig, PreferenceConfig
    from peftkit.models import load_causal_lm
    from peftkit.pairs import collate_pairs
    from peftkit.preference import Reference, completion_logps, pair_losses
    from peftkit.train import train

    from .test_preference import pair_data, recipe

    model = load_causal_lm(str(tiny_llama_dir)).model
    apply_method(model, LoraConfig(r=4, alpha=8))
    randomize(model)
    features = [
        {"prompt": [2, 8, 9, 24, 13], "chosen": [10, 3], "rejected": [11, 30, 3]},
        {"prompt": [2, 8, 9, 30], "chosen": [11, 3], "rejected": [10, 3]},
    ]
    out = {}
    for device in ("cpu", DEVICE):
        model.to(device)
        b = {k: v.to(device) for k, v in collate_pairs(features, 0, [0, 1]).items()}
        logps, counts, _ = completion_logps(model, b)
        ref = Reference().logps(model, b)
        result = pair_losses(PreferenceConfig(), *logps.chunk(2), counts.chunk(2), tuple(ref.chunk(2)))
        out[device] = torch.cat([logps, ref, result.losses]).float().cpu()
    torch.testing.assert_close(out[DEVICE], out["cpu"], atol=1e-3, rtol=1e-4)
    assert not torch.equal(out["cpu"][:4], out["cpu"][4:8])  # the adapter moves the answers
    summary = train(load_recipe(recipe(tmp_path, tiny_llama_dir, pair_data(tmp_path), **{"train.max_steps": 3})))
    assert summary["steps"] == 3 and 0.0 <= summary["validation"]["rewards/accuracies"] <= 1.0
