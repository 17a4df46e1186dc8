"""Every method on tiny models: identity at init, what trains, save/load, merge, bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import apply_method, load_adapter, save_adapter
from peftkit.errors import PeftkitError
from peftkit.methods import (
    METHODS,
    BottleneckConfig,
    IA3Config,
    PrefixTuningConfig,
    PromptTuningConfig,
    injection_of,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)

from .conftest import make_tokenizer, tiny_bert_config

IDS = torch.tensor([[2, 5, 9, 11, 13, 7, 3], [2, 17, 8, 3, 0, 0, 0]])
MASK = (IDS != 0).long()


def build(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(tiny_bert_config(num_labels=3))
    small = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        max_position_embeddings=70,
    )
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **small))
    if family == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, pad_token_id=0, **small))
    if family == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(pad_token_id=0, **small))
    if family == "mistral":
        return tf.MistralForCausalLM(
            tf.MistralConfig(
                vocab_size=40,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
            )
        )
    if family == "distilbert":
        return tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(
                vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=37, num_labels=3, pad_token_id=0
            )
        )
    if family == "llama":
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=40,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
            )
        )
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(
            tf.Qwen2Config(
                vocab_size=40,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
            )
        )
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    raise ValueError(family)


def out(model: nn.Module, ids: torch.Tensor = IDS, mask: torch.Tensor = MASK) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def configs() -> dict[str, object]:
    """One config per method (and per adapter placement)."""
    return {
        "lora": METHODS["lora"].config(r=4, alpha=8),
        "adapter-houlsby": BottleneckConfig(placement="houlsby", reduction_factor=4),
        "adapter-pfeiffer": BottleneckConfig(placement="pfeiffer", bottleneck_size=5, non_linearity="gelu"),
        "adapter-parallel": BottleneckConfig(placement="parallel", reduction_factor=4),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "prefix-projection": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
        "ia3": IA3Config(),
        "bitfit": METHODS["bitfit"].config(),
        "full": METHODS["full"].config(),
    }


IDENTITY_AT_INIT = {"lora", "adapter-houlsby", "adapter-pfeiffer", "adapter-parallel", "ia3", "bitfit", "full"}
FAMILIES = ("bert", "roberta", "electra", "deberta-v2", "distilbert", "llama", "qwen2", "mistral", "gpt2")
CASES = [
    (f, m)
    for f in FAMILIES
    for m in configs()
    if not (m == "bitfit" and f in ("llama", "qwen2", "mistral"))  # no biases to fit there
    and not (m.startswith("prefix") and f == "deberta-v2")
]  # its attention is its own (tested below)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_method_contract(family, method, tmp_path):
    """Identity where the method promises it, gradients only where it trains, exact save/load."""
    base = build(family)
    ref = out(base)
    model = build(family)
    apply_method(model, configs()[method])
    if method in IDENTITY_AT_INIT:
        assert torch.equal(out(model), ref), "an untrained adapter must leave the model unchanged"

    model.train()
    trainable = trainable_parameters(model)
    assert trainable
    loss = model(input_ids=IDS, attention_mask=MASK).logits.float().pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in {id(t) for t in trainable.values()}:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, f"{name} is frozen but got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())

    perturb(model)
    trained = out(model)
    assert trained.shape != ref.shape or not torch.allclose(trained, ref)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = build(family)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(out(fresh), trained), "save -> load must give identical logits"

    cfg = injection_of(model).method
    if METHODS[cfg.name].mergeable:
        merge(model)
        torch.testing.assert_close(out(model), trained, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(out(model), trained, atol=1e-5, rtol=0)
        merge_and_unload(model)
        torch.testing.assert_close(out(model), trained, atol=1e-5, rtol=0)
    else:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            merge_and_unload(model)


def test_trainable_counts_match_the_method():
    model = build("bert")
    apply_method(model, METHODS["bitfit"].config())
    names = set(trainable_parameters(model))
    assert names and all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    model = build("bert")
    apply_method(model, METHODS["full"].config())
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    model = build("bert")
    apply_method(model, IA3Config())
    ia3 = {n for n in trainable_parameters(model) if "ia3_l" in n}
    assert len(ia3) == 2 * 3  # key, value and feed-forward output in each of 2 layers
    ff = [m for m in model.modules() if getattr(m, "feedforward", False)]
    assert len(ff) == 2 and all(m.ia3_l.shape == (1, 37) for m in ff)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prefix_respects_padding_on_either_side(family):
    """A padded row gives the logits it gives alone: the widened mask hides the padding."""
    model = build(family)
    apply_method(model, PrefixTuningConfig(num_virtual_tokens=4))
    perturb(model)
    seq = torch.tensor([[5, 9, 11, 13]])
    alone = out(model, seq, torch.ones_like(seq))
    if family == "bert":  # encoders pad on the right
        padded = torch.tensor([[5, 9, 11, 13, 0, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
        torch.testing.assert_close(out(model, padded, mask), alone, atol=1e-5, rtol=0)
    else:  # decoders pad on the left; positions follow the real tokens
        padded = torch.tensor([[0, 0, 5, 9, 11, 13]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        model.eval()
        with torch.no_grad():
            logits = model(
                input_ids=padded, attention_mask=mask, position_ids=torch.tensor([[0, 0, 0, 1, 2, 3]])
            ).logits
        torch.testing.assert_close(logits[:, 2:], alone, atol=1e-5, rtol=0)


def test_prefix_needs_attention_it_can_reach():
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(PeftkitError, match="no attention layers"):
        apply_method(NoAttention(), PrefixTuningConfig(), modules_to_save=[])
    with pytest.raises(PeftkitError, match="DebertaV2ForSequenceClassification has no attention layers"):
        apply_method(build("deberta-v2"), PrefixTuningConfig())


def test_bad_method_options():
    with pytest.raises(PeftkitError, match="reduction_factor 64 is larger than the hidden size 32"):
        apply_method(build("bert"), BottleneckConfig(reduction_factor=64))
    with pytest.raises(PeftkitError, match="init_text needs the model's tokenizer"):
        apply_method(build("bert"), PromptTuningConfig(init_text="Classify this review"))
    with pytest.raises(PeftkitError, match="no bias terms"):
        apply_method(build("llama"), METHODS["bitfit"].config())
    with pytest.raises(ValueError):
        PromptTuningConfig(num_virtual_tokens=0)


def test_prompt_init_from_text_uses_the_token_embeddings():
    model = build("bert")
    tok = make_tokenizer()
    apply_method(model, PromptTuningConfig(num_virtual_tokens=5, init_text="good movie"), tokenizer=tok)
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    words = model.get_input_embeddings().weight
    expected = torch.stack([words[i] for i in (ids * 5)[:5]])
    assert torch.equal(model.peftkit_prompt.embedding.detach(), expected)
