"""The one method layer: every method's adapters switched off exactly, a frozen named adapter
beside a training one, and mixed batches of adapters of different methods on one base."""

from __future__ import annotations

import pytest
import torch

from peftkit import adapters_disabled, apply_method, save_adapter
from peftkit.adapter_io import read_adapter, read_adapter_weights
from peftkit.methods import (
    METHODS,
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    VeraConfig,
    active_adapters,
    trainable_parameters,
    trainable_state,
)
from peftkit.methods.named import NamedAdapters
from peftkit.methods.tuner_configs import LNTuningConfig

from .conftest import METHOD_EXAMPLES
from .test_methods import IDS, MASK, build, out, perturb

#: the methods whose adapters update layers in place of the base's, row by row
MIXED = {
    "lora": LoraConfig(r=4, alpha=8),
    "dora": LoraConfig(r=4, alpha=8, use_dora=True),
    "vera": VeraConfig(r=4),
    "loha": LoHaConfig(r=2, alpha=4),
    "lokr": LoKrConfig(r=2, alpha=4),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, alpha=8),
    "ia3": IA3Config(),
    "ln_tuning": LNTuningConfig(),
}


def test_every_registered_method_has_an_example():
    assert set(METHOD_EXAMPLES) == set(METHODS)
    assert {m.name for m in METHODS.values() if m.named} <= {c.name for c in MIXED.values()}


@pytest.mark.parametrize(
    ("method", "family"),
    [(m, f) for m in sorted(METHOD_EXAMPLES) for f in ("bert", "llama") if not (m == "bitfit" and f == "llama")],
)  # LLaMA has no biases
def test_adapters_disabled_gives_the_base_exactly(method, family):
    ref = out(build(family))
    model = build(family)
    apply_method(model, METHOD_EXAMPLES[method])
    perturb(model)
    adapted = out(model)
    assert not torch.equal(adapted, ref)
    with adapters_disabled(model):
        assert torch.equal(out(model), ref)
        with adapters_disabled(model):  # nested: still the base, and the outer state comes back
            assert torch.equal(out(model), ref)
        assert torch.equal(out(model), ref)
    assert torch.equal(out(model), adapted)  # everything back as it was


def test_a_merged_model_refuses_to_run_without_its_adapters():
    from peftkit.errors import PeftkitError
    from peftkit.methods import merge, unmerge

    model = build("llama")
    apply_method(model, LoraConfig(r=2))
    merge(model)
    with pytest.raises(PeftkitError, match="unmerge the adapters"), adapters_disabled(model):
        pass
    unmerge(model)


def saved_adapter(family: str, cfg, folder, seed: int):
    """An adapter of ``cfg`` with non-trivial weights, saved to ``folder``; returns the adapted
    model and the adapter's method and tensors as read back from the folder."""
    model = build(family)
    apply_method(model, cfg)
    perturb(model, seed=seed)
    save_adapter(model, folder, base_model="tiny", task="causal_lm" if family == "llama" else "classification")
    files = read_adapter(folder)
    return model, files.method_config(), read_adapter_weights(folder, files.method_config())


def test_a_frozen_named_adapter_beside_a_training_one_gets_no_gradient(tmp_path):
    reference, method, state = saved_adapter("llama", LoraConfig(r=4, alpha=8), tmp_path / "sft", seed=3)
    model = build("llama")
    apply_method(model, IA3Config())
    perturb(model, seed=4)
    before = set(trainable_state(model))
    named = NamedAdapters(model)
    named.add("reference", method, state)
    assert set(trainable_state(model)) == before  # checkpoints and the saved adapter hold the trained one only
    trained = out(model)
    with active_adapters(model, "reference"):
        frozen = out(model)
    model.train()  # a preference step: the policy and the reference in one graph
    policy = model(input_ids=IDS, attention_mask=MASK).logits
    with active_adapters(model, "reference"):
        ref = model(input_ids=IDS, attention_mask=MASK).logits
    (policy - ref).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(model).values())
    ids = {id(p) for p in trainable_parameters(model).values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids)
    assert (frozen - out(reference)).abs().max() <= 1e-5  # the reference computes as it did alone
    assert torch.equal(out(model), trained)


def test_mixed_rows_of_every_layer_method_equal_each_adapter_alone(tmp_path):
    ids = torch.tensor([[2, 5, 9, 11, 13, 7, 3], [2, 17, 8, 3, 6, 4, 1]])
    names = list(MIXED)
    alone, loaded = {}, NamedAdapters(build("llama"))
    for i, (name, cfg) in enumerate(MIXED.items()):
        model, method, state = saved_adapter("llama", cfg, tmp_path / name, seed=10 + i)
        alone[name] = model
        loaded.add(name, method, state)
    rows = ids.repeat(len(names) + 1, 1)[: len(names) + 1]  # one row per adapter, and one for the base
    masks = torch.ones_like(rows)
    per_row = names + [None]
    for grad in (False, True):
        with torch.set_grad_enabled(grad), loaded.per_row(per_row):
            got = loaded.model(input_ids=rows, attention_mask=masks).logits
        for i, name in enumerate(per_row):
            model = alone[name] if name is not None else build("llama")
            want = out(model, rows[i : i + 1], masks[i : i + 1])[0]
            assert (got[i] - want).abs().max() <= 1e-5, name
    assert not torch.equal(got[0], got[-1])


@pytest.mark.parametrize("method", ["bitfit", "full", "adapter"])
def test_an_adapter_that_loads_alone_is_exact_off_and_back_out(method, tmp_path):
    """BitFit, full fine-tuning and bottleneck adapters load only alone; the base's own values come
    back with adapters_disabled and when the adapter is deleted, and another adapter is refused."""
    from peftkit.errors import PeftkitError

    reference, cfg, state = saved_adapter("bert", METHOD_EXAMPLES[method], tmp_path / method, seed=5)
    base = out(build("bert"))
    named = NamedAdapters(build("bert"))
    named.add("alone", cfg, state)
    named.set_active("alone")
    assert (out(named.model) - out(reference)).abs().max() <= 1e-5
    with adapters_disabled(named.model):
        assert torch.equal(out(named.model), base) or method == "adapter"  # the head is the adapter's own
    _, lora, lora_state = saved_adapter("bert", LoraConfig(r=2), tmp_path / "lora", seed=6)
    with pytest.raises(PeftkitError, match="no other adapter can share its base"):
        named.add("other", lora, lora_state)
    if method != "adapter":
        with pytest.raises(PeftkitError, match="loaded into the base's own weights"):
            named.disable()
    named.delete("alone")
    named.add("other", lora, lora_state)  # the base is free again
    named.delete("other")
    assert torch.equal(out(named.model), base)
