"""LoRA math against a plain PyTorch formula; merge, unmerge and unload; what trains."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from peftkit import AdaptedLinear, LoraConfig, LoRAUpdate, apply_method, merge, merge_and_unload, unmerge
from peftkit.methods import count_parameters, trainable_parameters

from .conftest import tiny_bert_config


def lora_layer(base: nn.Module, **options) -> tuple[AdaptedLinear, LoRAUpdate]:
    """A frozen layer with one LoRA adapter ("default"), and that adapter's update."""
    layer = AdaptedLinear(base)
    layer.add("default", LoRAUpdate(base, **options))
    return layer, layer.updates["default"]


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value so that the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAUpdate):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer, lora = lora_layer(base, r=3, scaling=2.5)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 5, 12)
    expected = x @ base.weight.T + base.bias + 2.5 * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def composed_and_fused(x: torch.Tensor, bias: bool = True, autocast: bool = False):
    """Output and gradients of one frozen-base LoRA layer, through its own forward (the modules
    one by one) and through the speed layer's fused autograd node (peftkit.accel.frozen)."""
    from peftkit.accel.frozen import FrozenProduct

    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).requires_grad_(False)
    layer, lora = lora_layer(base, r=3, scaling=2.5)
    nn.init.normal_(lora.lora_B.weight)
    product = FrozenProduct.of(base, torch.bfloat16 if autocast else torch.float32)
    fused = functools.partial(lora.fused, product=product)
    results = []
    for forward in (layer, fused):
        inp = x.detach().clone().requires_grad_(x.requires_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(inp)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
        results.append({"out": out.detach(), "x": inp.grad, "A": lora.lora_A.weight.grad, "B": lora.lora_B.weight.grad})
        layer.zero_grad(set_to_none=True)
    return results


@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_layer_matches_the_composed_one(bias):
    composed, fused = composed_and_fused(torch.randn(4, 5, 12, requires_grad=True), bias)
    assert all(t is not None for t in fused.values())
    for name in composed:
        torch.testing.assert_close(fused[name], composed[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_fused_layer_under_autocast_multiplies_in_bf16():
    composed, fused = composed_and_fused(torch.randn(4, 5, 12, requires_grad=True), autocast=True)
    assert fused["out"].dtype == composed["out"].dtype == torch.bfloat16
    assert fused["x"].dtype == torch.float32 and fused["A"].dtype == torch.float32  # as the tensors they belong to
    for name in composed:  # the two round at different points: a bf16 step apart
        torch.testing.assert_close(fused[name].float(), composed[name].float(), atol=0.1, rtol=0.02, msg=name)


def test_the_fused_layer_skips_the_input_gradient_nobody_needs():
    composed, fused = composed_and_fused(torch.randn(4, 5, 12))  # a frozen model's first layer: no grad for x
    assert fused["x"] is None and composed["x"] is None
    torch.testing.assert_close(fused["A"], composed["A"], atol=1e-5, rtol=1e-5)


def test_zero_init_leaves_output_unchanged():
    base = nn.Linear(8, 8)
    layer, lora = lora_layer(base, r=4, scaling=1.0)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))
    assert lora.lora_A.weight.abs().sum() > 0  # A is random, B is zero


def test_conv1d_fan_in_fan_out_matches_formula():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(nf=6, nx=10)  # weight (in=10, out=6)
    nn.init.normal_(base.weight)
    layer, lora = lora_layer(base, r=2, scaling=0.5)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 3, 10)
    expected = x @ base.weight + base.bias + 0.5 * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=32).scaling() == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling() == 8.0


def tiny_classifier(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()


def test_merge_unmerge_and_unload_keep_logits():
    model = tiny_classifier()
    apply_method(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    ids = torch.randint(5, 30, (3, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge(model)
        merged = model(input_ids=ids).logits
        unmerge(model)
        again = model(input_ids=ids).logits
        restored = merge_and_unload(model)
        unloaded = model(input_ids=ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5
    assert (unloaded - unmerged).abs().max() <= 1e-5
    assert restored and not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert not hasattr(model, "peftkit")
    # the update is real: it changed the logits compared with the bare base
    bare = tiny_classifier()
    with torch.no_grad():
        assert (bare(input_ids=ids).logits - unmerged).abs().max() > 1e-3


def test_only_lora_and_head_get_gradients():
    model = tiny_classifier().train()
    inj = apply_method(model, LoraConfig(r=2, target_modules=["query", "value"]))
    assert inj.modules_to_save == ["classifier"]
    assert len(inj.replaced) == 4  # 2 layers x (query, value)
    randomize_lora(model)
    out = model(input_ids=torch.randint(5, 30, (2, 7)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    trainable = {id(p) for p in trainable_parameters(model).values()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert "lora_" in name or name.startswith("classifier."), name
        else:
            assert p.grad is None and not p.requires_grad, name
    n_trainable, total = count_parameters(model)
    expected = 4 * 2 * (32 + 32) + 32 * 3 + 3  # A and B per layer, plus the head
    assert n_trainable == expected and total > n_trainable


def test_applying_twice_is_refused():
    from peftkit import PeftkitError

    model = tiny_classifier()
    apply_method(model, LoraConfig())
    with pytest.raises(PeftkitError, match="already"):
        apply_method(model, LoraConfig())


def test_golden_values_with_fixed_seed():
    """Deterministic init: the first LoRA A row and the untrained logits are fixed by the seed."""
    torch.manual_seed(123)
    layer, lora = lora_layer(nn.Linear(4, 3), r=2, scaling=1.0)
    first = lora.lora_A.weight[0].tolist()
    torch.manual_seed(123)
    again, again_update = lora_layer(nn.Linear(4, 3), r=2, scaling=1.0)
    assert again_update.lora_A.weight[0].tolist() == first
    # kaiming-uniform(a=sqrt(5)) on fan_in=4 draws from U(-1/2, 1/2)
    assert all(-0.5 <= v <= 0.5 for v in lora.lora_A.weight.flatten().tolist())
