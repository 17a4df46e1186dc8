"""A quantized frozen base: LoRA on bitsandbytes 4-bit and 8-bit linears, on CPU."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from peftkit import apply_method, load_adapter, save_adapter
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.methods import AdaptedLinear, LoraConfig, trainable_parameters
from peftkit.quantize import QuantizationConfig, dequantized_weight, quantize_model, require_bitsandbytes

from .conftest import tiny_recipe
from .test_errors import expect_error
from .test_methods import IDS, MASK, build, out, perturb

pytest.importorskip("bitsandbytes")
KINDS = [
    QuantizationConfig(bits=4, quant_type="nf4"),
    QuantizationConfig(bits=4, quant_type="fp4", double_quant=False),
    QuantizationConfig(bits=8),
]


@pytest.mark.parametrize("qcfg", KINDS, ids=["nf4", "fp4", "int8"])
def test_lora_on_a_quantized_linear_equals_the_dequantized_computation(qcfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    report = quantize_model(model, qcfg)
    assert report.layers == 1 and report.bytes_after < report.bytes_before
    apply_method(model, LoraConfig(r=4, alpha=8, target_modules=["0"]), modules_to_save=[])
    layer = model[0]
    assert isinstance(layer, AdaptedLinear) and type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
    lora = layer.updates["default"]
    perturb(model)
    x = torch.randn(3, 5, 64)
    w = dequantized_weight(layer.base_layer)
    expected = x @ w.T + layer.base_layer.bias + lora.scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    got = model(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-4

    x.requires_grad_(True)
    model(x).pow(2).mean().backward()
    trained = {id(p) for p in trainable_parameters(model).values()}
    assert trained == {id(lora.lora_A.weight), id(lora.lora_B.weight)}
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("qcfg", KINDS[::2], ids=["nf4", "int8"])
def test_quantized_bert_save_load_and_size(qcfg, tmp_path):
    model = build("bert")
    report = quantize_model(model, qcfg, skip=["classifier"])
    assert report.layers == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; pooler
    limit = 0.3 if qcfg.bits == 4 else 0.3 + 0.01
    assert report.bytes_after <= limit * report.bytes_before
    apply_method(model, LoraConfig(r=4, alpha=8))
    perturb(model)
    trained = out(model)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = build("bert")
    quantize_model(fresh, qcfg, skip=["classifier"])
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(out(fresh), trained), "quantization is deterministic: same logits after load"


def test_full_fine_tuning_refuses_a_quantized_base(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    expect_error(
        capsys,
        ["train", str(recipe), "method.name=full", "quantization.bits=4"],
        "full fine-tuning cannot train a quantized base",
    )


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["quantization.bits=3"], "quantization.bits"),
        (["quantization.bits=4", "quantization.quant_type=int2"], "quantization.quant_type"),
        (["quantization.bits=4", "quantization.compute_dtype=float8"], "quantization.compute_dtype"),
    ],
)
def test_bad_quantization_options(overrides, needle, tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    expect_error(capsys, ["train", str(recipe), *overrides], needle)
    assert not (tmp_path / "run").exists()


def test_missing_bitsandbytes_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(PeftkitError, match="pip install bitsandbytes"):
        require_bitsandbytes()


def test_qlora_trains_predicts_and_merges_from_the_cli(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    assert main(["train", str(recipe), "quantization.bits=4", "train.optimizer=adamw_8bit"]) == 0
    captured = capsys.readouterr().out
    assert "quantized 13 linear layers to 4 bits" in captured
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation"]["accuracy"] >= 0.9
    assert summary["quantization"]["ratio"] <= 0.3 and summary["peak_rss_bytes"] > 0
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["eval", "--adapter", adapter, "--data", str(sentiment_dir), "--quantize", "4"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["merge", "--adapter", adapter, "--quantize", "4", "--output", str(tmp_path / "m")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    diff = float(line.rsplit(": ", 1)[1].rstrip(")"))
    assert diff <= 1e-4, line  # merged in float32 from the dequantized weights it computed with
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert all(type(m) is not nn.Module and "4bit" not in type(m).__name__ for m in merged.modules())


@pytest.mark.parametrize("method", ["lora", "adapter-houlsby", "adapter-parallel", "prefix", "prompt", "ia3", "bitfit"])
def test_every_method_trains_on_a_quantized_base(method, tmp_path):
    from .test_methods import configs

    model = build("bert")
    quantize_model(model, KINDS[0], skip=["classifier"])
    apply_method(model, configs()[method])
    model.train()
    model(input_ids=IDS, attention_mask=MASK).logits.pow(2).mean().backward()
    trainable = trainable_parameters(model)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    ids = {id(p) for p in trainable.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids)
    perturb(model)
    trained = out(model)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = build("bert")
    quantize_model(fresh, KINDS[0], skip=["classifier"])
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(out(fresh), trained)


@pytest.mark.parametrize(
    "quant_type,double_quant,compute_dtype",
    [("nf4", True, "float32"), ("fp4", False, "float32"), ("nf4", True, "bfloat16")],
)
def test_cpu_4bit_layer_matches_bitsandbytes_own_forward_and_backward(quant_type, double_quant, compute_dtype):
    """The shared-buffer CPU path computes what bitsandbytes' Linear4bit computes, gradients included."""
    import bitsandbytes as bnb

    from peftkit.quantize import _native_dequantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40))
    quantize_model(
        model, QuantizationConfig(bits=4, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
    )
    layer = model[0]
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert _native_dequantizer(state, layer.compute_dtype, state.shape[1]) is not None  # the buffer path runs
    layer.bias.requires_grad_(True)  # as BitFit on a quantized base
    x = torch.randn(2, 7, 96, requires_grad=True)
    results = []
    for forward in (layer.forward, lambda t: bnb.nn.Linear4bit.forward(layer, t)):
        x.grad = layer.bias.grad = None
        y = forward(x)
        y.pow(2).sum().backward()
        results.append((y.detach().float(), x.grad.float(), layer.bias.grad.float()))
    tol = 1e-5 if compute_dtype == "float32" else 2e-2
    for ours, theirs in zip(results[0], results[1]):
        assert torch.allclose(ours, theirs, rtol=tol, atol=tol)
