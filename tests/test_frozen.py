"""The frozen layers' prepared products: the same losses and gradients as the layers' own
forward, the layers left out (trainable, tied, the output head, subclasses), and nothing left
behind after the block."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import peftkit.accel.frozen as frozen
from peftkit import LoraConfig, apply_method
from peftkit.accel import StepSpeedups
from peftkit.accel.frozen import FrozenProduct, can_pack
from peftkit.lm_loss import causal_lm_loss

from .conftest import _new_lm, tiny_bert_config


def lora_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    apply_method(model, LoraConfig(r=4, target_modules=["query", "value"]), ["classifier"])
    return with_update(model)


def with_update(model):
    """A non-zero LoRA update, so that A's gradient is not zero either."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.train()


def lora_lm(family: str, targets: list[str], tied: bool = True):
    torch.manual_seed(0)
    model = _new_lm(family)
    if not tied:  # a separate output head, as many LLMs have
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    apply_method(model, LoraConfig(r=4, target_modules=targets), [])
    return with_update(model)


def bert_loss(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss


def lm_loss(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (2, 7), generator=g)
    return causal_lm_loss(model, ids, ids.clone())


MODELS = {
    "bert": (lora_bert, bert_loss),
    "gpt2": (lambda: lora_lm("gpt2", ["c_attn"]), lm_loss),
    "llama": (lambda: lora_lm("llama", ["q_proj", "v_proj"]), lm_loss),
}


def step(model, loss_of, block, bf16: bool):
    """Loss and gradients of one step, inside ``block`` (None: the layers' own forward)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks
    with block if block is not None else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(model)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_unpacked_products_give_bit_for_bit_the_steps_of_the_layers_own_forward(name, bf16, monkeypatch):
    """Without oneDNN packing a product multiplies the same numbers in the same dtype as the
    layer would (under autocast, the bf16 casts autocast makes)."""
    monkeypatch.setattr(frozen, "can_pack", lambda dtype: False)
    build, loss_of = MODELS[name]
    model = build()
    own = step(model, loss_of, None, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    block = StepSpeedups(
        model, dtype, fuse_lora=False, dropout=False, attention=False
    )  # GPT-2 drops: torch's masks in both
    assert len(block.frozen) > 0
    lent = step(model, loss_of, block, bf16)
    assert torch.equal(own[0], lent[0])
    assert own[1].keys() == lent[1].keys() and own[1]
    for param, grad in own[1].items():
        assert torch.equal(grad, lent[1][param]), param
    # LoRA layers fused with the prepared products: the same step up to the order of the sums
    fused = step(model, loss_of, StepSpeedups(model, dtype, dropout=False, attention=False), bf16)
    tol = dict(atol=0.03, rtol=0.03) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused[0], own[0], **tol)
    for param, grad in own[1].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(fused[1][param] / scale, grad / scale, **tol, msg=param)


@pytest.mark.skipif(not can_pack(torch.float32), reason="this torch build cannot prepack weights with oneDNN")
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_products_give_the_steps_of_the_layers_own_forward(name, bf16):
    if bf16 and not can_pack(torch.bfloat16):
        pytest.skip("no bf16 oneDNN kernels here")
    build, loss_of = MODELS[name]
    model = build()
    own = step(model, loss_of, None, bf16)
    block = StepSpeedups(model, torch.bfloat16 if bf16 else torch.float32, dropout=False, attention=False)
    assert "oneDNN-packed" in block.describe()
    lent = step(model, loss_of, block, bf16)
    tol = dict(atol=0.03, rtol=0.03) if bf16 else dict(atol=1e-5, rtol=1e-4)  # sums taken in another order
    torch.testing.assert_close(lent[0], own[0], **tol)
    for param, grad in own[1].items():
        scale = grad.abs().max().item()
        assert scale > 0, param
        torch.testing.assert_close(lent[1][param] / scale, grad / scale, **tol, msg=param)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_product_and_its_input_gradient(dtype, pack):
    if pack and not can_pack(dtype):
        pytest.skip("oneDNN cannot prepack this dtype here")
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    product = FrozenProduct.of(layer, dtype, pack)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    # float32 to float32 rounding; bfloat16 keeps 8 bits of mantissa
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for rows in (1, 7, 600):  # oneDNN packs for one row count; any other must work too
        x, g = torch.randn(rows, 40), torch.randn(3, rows, 24)
        x, g = x.to(dtype).double(), g.to(dtype).double()  # the inputs as the product sees them
        torch.testing.assert_close(product.forward(x.to(dtype)).double(), x @ w.T + b, **tol)
        torch.testing.assert_close(product.input_grad(g.to(dtype)).double(), g @ w, **tol)


def test_which_layers_multiply_with_prepared_products_and_that_the_block_leaves_nothing_behind():
    model = lora_bert()
    block = StepSpeedups(model, torch.bfloat16)
    loras = {n: m for n, m in model.named_modules() if type(m).__name__ == "AdaptedLinear"}
    with block:
        lent = {n for n, m in model.named_modules() if "forward" in vars(m)}
        # the LoRA layers are handed their prepared base, and compute with it as one node
        assert loras and all(m.product is not None for m in loras.values())
    # the frozen linear layers: 4 in attention and 2 in the feed-forward part of each layer, and the pooler;
    # not the trained LoRA factors nor the trained classifier
    assert lent == {
        f"bert.encoder.layer.{i}.{m}"
        for i in range(2)
        for m in (
            "attention.self.query.base_layer",
            "attention.self.key",
            "attention.self.value.base_layer",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    } | {"bert.pooler.dense"}
    assert len(block.frozen) == len(lent)
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(m.product is None for m in loras.values())


@pytest.mark.parametrize("tied", [True, False])
def test_a_decoder_keeps_its_embeddings_and_output_head_as_they_are(tied):
    model = lora_lm("llama", ["q_proj", "v_proj"], tied=tied)
    with StepSpeedups(model, torch.bfloat16):
        assert "forward" not in vars(model.get_output_embeddings())
        assert "forward" in vars(model.model.layers[0].mlp.down_proj)


def test_subclasses_and_trainable_layers_are_left_out():
    class Quantized(nn.Linear):  # a quantized layer's forward is its own
        pass

    model = nn.Sequential(nn.Linear(4, 4), Quantized(4, 4), nn.Linear(4, 4)).requires_grad_(False)
    model[2].bias.requires_grad_(True)
    block = StepSpeedups(model, torch.float32)
    with block:
        assert ["forward" in vars(m) for m in model] == [True, False, False]


def test_an_error_inside_the_block_restores_the_layers():
    model = lora_bert()
    with pytest.raises(RuntimeError, match="mid-step"), StepSpeedups(model, torch.bfloat16):
        raise RuntimeError("mid-step")
    assert not any("forward" in vars(m) for m in model.modules())
    x = torch.randn(2, 32)
    layer = model.bert.pooler.dense
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias)
