"""The speed layer's dropout and the attention function with the same mask: drop rate, scaling,
gradients, and equality with transformers' SDPA attention wherever nothing is dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.accel import StepSpeedups
from peftkit.accel.dropout import _attention, fast_dropout, keep_mask


def fast(p: float, training: bool = True):
    """The speed layer's forward for an ``nn.Dropout(p)`` in training (or eval) mode."""
    return fast_dropout(nn.Dropout(p).train(training))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_drops_at_the_rate_and_keeps_the_mean(p):
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 0.002  # 1e6 draws: the standard error is at most 5e-4
    assert abs(scale * (1 - round(p * 65536) / 65536) - 1) < 1e-12  # kept elements restore the mean exactly


def test_mask_is_not_a_repeating_pattern():
    torch.manual_seed(1)
    keep, _ = keep_mask(torch.Size([4096, 4]), 0.5)
    # each of the four 16-bit lanes of a word decides its own element: columns are independent
    corr = torch.corrcoef(keep.float().T)
    assert (corr - torch.eye(4)).abs().max() < 0.06
    keep2, _ = keep_mask(torch.Size([4096, 4]), 0.5)
    assert not torch.equal(keep, keep2)


def test_forward_and_backward_use_one_mask():
    torch.manual_seed(0)
    drop = fast(0.3)
    x = torch.randn(64, 48, requires_grad=True)
    y = drop(x)
    kept = y != 0
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradient_match_masking_then_scaling(dtype):
    # the fast path multiplies in another order; the values must still be exactly x * mask * scale
    x = torch.randn(8, 33, 40).to(dtype).requires_grad_()
    grad = torch.randn(8, 33, 40).to(dtype)
    torch.manual_seed(5)
    y = fast(0.1)(x)
    y.backward(grad)
    torch.manual_seed(5)
    keep, scale = keep_mask(x.shape, 0.1)
    assert torch.equal(y, torch.mul(x.detach(), keep).mul_(scale))
    assert torch.equal(x.grad, torch.mul(grad, keep).mul_(scale))


def test_eval_mode_and_p_zero_are_the_identity_and_seeding_repeats():
    x = torch.randn(8, 8)
    assert fast(0.5, training=False)(x) is x
    assert fast(0.0)(x) is x
    torch.manual_seed(3)
    a = fast(0.5)(x)
    torch.manual_seed(3)
    b = fast(0.5)(x)
    assert torch.equal(a, b)


def test_the_speed_layer_takes_only_active_plain_dropouts_and_gives_them_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0), nn.Dropout2d(0.1))
    layer = StepSpeedups(model, torch.float32)
    assert layer.dropouts == 1
    with layer:
        assert "forward" in vars(model[1]) and type(model[1]) is nn.Dropout and model[1].p == 0.1
        assert "forward" not in vars(model[2]) and "forward" not in vars(model[3])
    assert type(model[2]) is nn.Dropout and type(model[3]) is nn.Dropout2d
    assert not any("forward" in vars(m) for m in model)


class _Attn(nn.Module):
    def __init__(self, causal: bool = False, groups: int = 1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


@pytest.mark.parametrize("kind", ["bool", "float", "causal", "gqa"])
def test_attention_without_dropping_equals_sdpa(kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    groups = 2 if kind == "gqa" else 1
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 4 // groups, 6, 8), torch.randn(2, 4 // groups, 6, 8)
    mask = None
    if kind in ("bool", "float"):
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).bool()[:, None, None, :].expand(2, 1, 6, 6)
        if kind == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Attn(causal=kind in ("causal", "gqa"), groups=groups).train()
    # p below 1/65536 drops nothing but takes the path that draws the mask
    ours, _ = _attention(module, q, k, v, mask, dropout=1e-6, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert ours.shape == ref.shape == (2, 6, 4, 8)
    assert (ours - ref).abs().max() < 1e-5


def test_attention_drops_probabilities_in_training():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    v = torch.eye(64).expand(1, 2, 64, 64)  # the output rows are the attention probabilities themselves
    probs, _ = _attention(_Attn().train(), q, k, v, None, dropout=0.5)
    zero = (probs == 0).float().mean().item()
    assert 0.45 < zero < 0.55
    sums = probs.sum(-1)  # rescaled: each row sums to 1 on average
    assert abs(sums.mean().item() - 1) < 0.1


def test_model_switch_keeps_outputs_and_trains(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2, attn_implementation="sdpa")
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 10, 11, 3]])
    mask = (ids != 0).long()
    model.eval()
    ref = model(input_ids=ids, attention_mask=mask).logits
    layer = StepSpeedups(model, torch.float32)
    assert layer.attention is not None and layer.dropouts > 0
    with layer:
        assert model.config._attn_implementation == layer.attention
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        model.train()
        torch.manual_seed(1)
        a = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(1)
        b = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(a, b) and not torch.equal(a, ref)  # seeded, and dropout is on
        a.sum().backward()
    assert model.classifier.weight.grad is not None
    assert model.config._attn_implementation == "sdpa"  # given back


def test_p_that_rounds_to_one_falls_back_to_torch():
    x = torch.randn(16, 16)
    assert torch.equal(fast(1.0)(x), torch.zeros_like(x))
    torch.manual_seed(0)
    y = fast(0.999995)(x)  # would round to dropping all 65536 lane values
    assert torch.isfinite(y).all()


def _reference_attention(q, k, v, bias, scale, p, seed):
    """The attention core composed of autograd ops, with the mask keep_mask draws after ``seed``."""
    torch.manual_seed(seed)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    keep, s = keep_mask(probs.shape, p)
    return (probs * keep * s) @ v


@pytest.mark.parametrize("masking", ["none", "bool", "causal"])
def test_attention_core_backward_is_the_gradient(masking):
    from peftkit.accel.dropout import _additive, _AttentionCore

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = None
    if masking == "bool":
        bias = _additive(torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()[:, None, None, :], torch.float64)
    elif masking == "causal":
        bias = _additive(torch.ones(5, 5, dtype=torch.bool).tril(), torch.float64)
    # p under 1/65536 drops nothing, so every call sees the same function
    assert torch.autograd.gradcheck(lambda a, b, c: _AttentionCore.apply(a, b, c, bias, 0.7, 1e-6), (q, k, v))


def test_attention_core_matches_autograd_ops_with_dropping():
    from peftkit.accel.dropout import _AttentionCore

    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3)]
    bias = torch.zeros(2, 1, 1, 7).masked_fill_(torch.arange(7) >= 5, torch.finfo(torch.float32).min)
    grad = torch.randn(2, 3, 7, 8)
    torch.manual_seed(9)
    ours = _AttentionCore.apply(*inputs, bias, 0.35, 0.3)
    ours_grads = torch.autograd.grad(ours, inputs, grad)
    ref = _reference_attention(*inputs, bias, 0.35, 0.3, seed=9)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    assert (ours - ref).abs().max() < 1e-5
    for a, b in zip(ours_grads, ref_grads):
        assert (a - b).abs().max() < 1e-5


def test_attention_under_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1] * 6 + [0] * 3, [1] * 9]).bool()[:, None, None, :].expand(2, 1, 9, 9)
    module = _Attn().train()
    results = []
    for bf16 in (False, True):
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = _attention(module, q, k, v, mask, dropout=0.2, scaling=0.25)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((out.float(), grads))
    (out32, g32), (out16, g16) = results
    assert (out16 - out32).abs().max() < 0.05 * out32.abs().max()
    for a, b in zip(g16, g32):
        assert (a - b).abs().max() < 0.05 * b.abs().max()
