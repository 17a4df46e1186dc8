"""The chunked causal-LM loss equals the model's own loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from peftkit.lm_loss import causal_lm_loss
from peftkit.methods import apply_method

from .test_methods import IDS, MASK, build, configs, perturb

LABELS = IDS.masked_fill(MASK == 0, -100).masked_fill(torch.arange(7) < 2, -100)  # no loss on prompt or padding


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, chunk_elements, **extra):
    model.eval()  # no dropout: both passes see the same network (gradients flow all the same)
    reference = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
    ref_grads = _grads(model, reference)
    ours = causal_lm_loss(model, IDS, LABELS, attention_mask=MASK, chunk_elements=chunk_elements, **extra)
    our_grads = _grads(model, ours)
    assert torch.allclose(ours, reference, atol=1e-5), (ours.item(), reference.item())
    assert ref_grads.keys() == our_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(our_grads[name], g, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunk_elements", [40 * 3, 10**6], ids=["3-token-chunks", "one-chunk"])
def test_full_model_loss_and_gradients_match(family, chunk_elements):
    """Every weight trainable, the (tied) LM head included."""
    model = build(family)
    model.config.tie_word_embeddings = True
    _compare(model, chunk_elements)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "adapter-houlsby", "ia3"])
def test_methods_on_a_decoder_match(method):
    """Soft prompts lengthen the sequence: their positions carry no loss."""
    model = build("llama")
    apply_method(model, configs()[method], modules_to_save=[])
    perturb(model)
    _compare(model, 40 * 2)


def test_a_head_that_is_not_a_plain_linear_goes_through_the_module():
    class Head(torch.nn.Linear):
        pass

    model = build("llama")
    old = model.get_output_embeddings()
    head = Head(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    model.set_output_embeddings(head)
    _compare(model, 40 * 3)


def test_num_items_sets_the_divisor():
    model = build("llama")
    with torch.no_grad():
        mean = causal_lm_loss(model, IDS, LABELS, attention_mask=MASK)
        total = causal_lm_loss(model, IDS, LABELS, attention_mask=MASK, num_items=1)
    count = int((LABELS[:, 1:] != -100).sum())
    assert torch.allclose(total, mean * count, atol=1e-4)
