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


# The decoding step of its own (DecodeProducts.step, LLaMA architecture): the same logits and
# cache as the model's forward, step by step over a left-padded batch; rows leaving and joining;
# and standing aside for models it cannot see into.

STEPPED = LAYER_METHODS + ["dora", "adapter", "full"]
ASIDE = ["ln_tuning", "prompt", "ptuning", "prefix"]  # replaced norms; hooks on the model


def _method(name: str):
    return adapted("lora", use_dora=True) if name == "dora" else adapted(name)


@pytest.mark.parametrize("name", STEPPED)
def test_decoding_step_gives_the_models_logits_and_cache(name):
    model = _method(name)
    prompts = [[2, 8, 9, 30, 31, 12, 13], [2, 8, 41, 12, 13], [2, 40, 13]]
    with DecodeProducts(model, torch.float32) as prepared:
        assert prepared.step is not None
        reference = StepDecoder(model, 0)
        reference.add([Sequence(list(p), 10) for p in prompts])
        ids = torch.tensor([[r.tokens[-1]] for r in reference.rows])
        mask, kv = reference.mask, reference.kv
        theirs = ours = kv
        for _ in range(6):
            positions = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            want, theirs = reference._forward(reference.rows, ids, mask, positions, theirs)
            got, ours = prepared.step(ids, mask, positions, ours)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for (k0, v0), (k1, v1) in zip(theirs, ours):
                torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
            ids = want.argmax(-1, keepdim=True)


def test_decoding_step_with_rows_leaving_and_joining_decodes_as_the_model():
    model = adapted("lora")
    first = [[2, 8, 9, 30, 31, 12, 13], [2, 8, 41, 12, 13], [2, 40, 13]]
    later = [[2, 9, 9, 41, 12, 13, 30, 31, 40], [2, 13]]

    def decode(step):
        decoder = StepDecoder(model, 0, decode_step=(lambda: step) if step else None)
        rows = [Sequence(list(p), n) for p, n in zip(first, (3, 9, 6))]
        decoder.add(rows)
        for i in range(12):
            decoder.drop(lambda r: r.finish is not None)
            if i == 2:  # new requests join a running batch, with a wider prompt
                joined = [Sequence(list(p), 7) for p in later]
                decoder.add(joined)
            decoder.step()
        return [r.tokens for r in rows + joined]

    want = decode(None)
    with DecodeProducts(model, torch.float32) as prepared:
        got = decode(prepared.step)
    assert got == want
    assert all(len(t) > 2 for t in want)


@pytest.mark.parametrize("name", ASIDE)
def test_decoding_step_stands_aside_where_the_model_is_not_plain(name):
    model = adapted(name)
    with DecodeProducts(model, torch.float32) as prepared:
        assert prepared.step is None
    assert prepared.step is None


def test_decoding_step_stands_aside_for_hooks_and_other_architectures():
    model = adapted("lora")
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    with DecodeProducts(model, torch.float32) as prepared:
        assert prepared.step is None
    handle.remove()
    with DecodeProducts(build_lm("gpt2"), torch.float32) as prepared:
        assert prepared.step is None


def test_layers_reading_one_input_multiply_once():
    model = adapted("lora")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        with DecodeProducts(model, torch.float32) as prepared:
            shared = prepared.shared[attn.q_proj]
            assert (
                prepared.shared[attn.v_proj] is shared
                and prepared.shared[model.model.layers[0].mlp.up_proj] is not shared
            )
            calls = []
            multiply = shared.product.forward
            shared.product.forward = lambda t: calls.append(t.shape) or multiply(t)
            got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
            assert len(calls) == 1  # one product for the three layers
            attn.k_proj(x.clone())
            assert len(calls) == 2  # another input: multiplied again
            model.model.layers[0].mlp.up_proj(torch.randn(2, 3, 32))
            attn.q_proj(x)
            assert len(calls) == 3  # one output is kept at a time: another group's replaced it
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
