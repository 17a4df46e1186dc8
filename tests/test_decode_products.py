"""accel's DecodeProducts (generation's prepared, merged linear products): the same logits as the
adapted model's own forward for every method that updates linear layers (float32 to rounding,
bf16 close), layers it cannot merge left to their own forward, and the model as it was after."""

from __future__ import annotations

import pytest
import torch

from peftkit.accel import DecodeProducts
from peftkit.generation import Sequence, StepDecoder
from peftkit.methods.base import apply_method

from .conftest import METHOD_EXAMPLES, build_lm

LAYER_METHODS = ["lora", "vera", "loha", "lokr", "adalora", "ia3"]


def adapted(name: str, **options):
    model = build_lm("llama").eval()
    cfg = METHOD_EXAMPLES[name].model_copy(update=options)
    apply_method(model, cfg, [])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # updates that are not zero, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", LAYER_METHODS + ["dora"])
def test_prepared_products_give_the_models_own_logits(name):
    model = adapted("lora", use_dora=True) if name == "dora" else adapted(name)
    ids = torch.tensor([[2, 8, 9, 30, 31, 40, 12, 13], [2, 8, 41, 42, 43, 44, 12, 13]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with DecodeProducts(model, torch.float32) as prepared:
            got = model(input_ids=ids).logits
        assert prepared.layers > 0
        with DecodeProducts(model, torch.bfloat16):
            half = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (half - want).abs().max() < 0.05 * want.abs().max()
    assert torch.equal(after, want)  # leaving restored every layer's own forward
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_greedy_decoding_is_unchanged_in_float32():
    model = adapted("lora")
    prompts = [[2, 8, 9, 30, 31, 12, 13], [2, 8, 41, 12, 13]]

    def decode():
        seqs = [Sequence(list(p), 8) for p in prompts]
        StepDecoder(model, 0).run(seqs)
        return [s.tokens for s in seqs]

    want = decode()
    with DecodeProducts(model, torch.float32):
        assert decode() == want
