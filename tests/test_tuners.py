"""VeRA, LoHa, LoKr, AdaLoRA and P-tuning both ways against peft 0.21.2 (random non-zero weights;
BERT, LLaMA and, where the method takes Conv1D, GPT-2), their merges, training, and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftkit import apply_method, load_adapter, save_adapter
from peftkit.errors import PeftkitError
from peftkit.methods import (
    METHODS,
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    PTuningConfig,
    VeraConfig,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from peftkit.methods.tuner_configs import LNTuningConfig

from .test_interop_peft import INPUT, MASK, logits, perturb
from .test_lora_variants import build

peft = pytest.importorskip("peft")
SEQ_CLS = "SEQ_CLS"
#: every normalization layer of the tiny models, as peft's target names
NORMS = {
    "bert": ["LayerNorm"],
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
}

#: case -> (peft config from targets and family, the same as a peftkit config)
CASES = {
    "vera": (
        lambda t, f: peft.VeraConfig(task_type=SEQ_CLS, r=4, target_modules=t, fan_in_fan_out=f == "gpt2"),
        lambda t: VeraConfig(r=4, target_modules=t),
    ),
    "vera-seeded": (
        lambda t, f: peft.VeraConfig(
            task_type=SEQ_CLS,
            r=3,
            target_modules=t,
            projection_prng_key=5,
            save_projection=False,
            d_initial=0.5,
            fan_in_fan_out=f == "gpt2",
        ),
        lambda t: VeraConfig(r=3, target_modules=t, projection_prng_key=5, save_projection=False, d_initial=0.5),
    ),
    "loha": (
        lambda t, f: peft.LoHaConfig(task_type=SEQ_CLS, r=4, alpha=8, target_modules=t),
        lambda t: LoHaConfig(r=4, alpha=8, target_modules=t),
    ),
    "loha-patterns": (
        lambda t, f: peft.LoHaConfig(
            task_type=SEQ_CLS, r=4, alpha=8, target_modules=t, rank_pattern={t[-1]: 2}, alpha_pattern={t[0]: 3.0}
        ),
        lambda t: LoHaConfig(r=4, alpha=8, target_modules=t, rank_pattern={t[-1]: 2}, alpha_pattern={t[0]: 3.0}),
    ),
    "lokr": (
        lambda t, f: peft.LoKrConfig(task_type=SEQ_CLS, r=4, alpha=8, target_modules=t),
        lambda t: LoKrConfig(r=4, alpha=8, target_modules=t),
    ),
    "lokr-both": (
        lambda t, f: peft.LoKrConfig(
            task_type=SEQ_CLS, r=1, alpha=2, target_modules=t, decompose_both=True, decompose_factor=4
        ),
        lambda t: LoKrConfig(r=1, alpha=2, target_modules=t, decompose_both=True, decompose_factor=4),
    ),
    "adalora": (
        lambda t, f: peft.AdaLoraConfig(
            task_type=SEQ_CLS, init_r=6, target_r=2, total_step=10, lora_alpha=8, target_modules=t
        ),
        lambda t: AdaLoraConfig(init_r=6, target_r=2, total_step=10, alpha=8, target_modules=t),
    ),
    "ptuning": (
        lambda t, f: peft.PromptEncoderConfig(task_type=SEQ_CLS, num_virtual_tokens=3, encoder_hidden_size=16),
        lambda t: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    ),
    "ptuning-lstm": (
        lambda t, f: peft.PromptEncoderConfig(
            task_type=SEQ_CLS, num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        ),
        lambda t: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, encoder="lstm"),
    ),
    "ln_tuning": (
        lambda t, f: peft.LNTuningConfig(task_type=SEQ_CLS, target_modules=NORMS[f]),
        lambda t: LNTuningConfig(),
    ),  # every normalization layer: the same ones
}
LINEAR_ONLY = ("loha", "lokr")  # peft's LyCORIS layers take nn.Linear, not Conv1D
PAIRS = [(c, f) for c in CASES for f in ("bert", "llama", "gpt2") if not (f == "gpt2" and c.startswith(LINEAR_ONLY))]
#: the cases whose method merges, as the registry says
MERGEABLE = tuple(c for c, (_, ours) in CASES.items() if METHODS[ours(["x"]).name].mergeable)


def peft_made(case: str, family: str, folder):
    base, targets = build(family)
    ref = peft.get_peft_model(copy.deepcopy(base), CASES[case][0](targets, family))
    perturb([p for p in ref.parameters() if p.requires_grad], seed=7)
    ref.save_pretrained(str(folder))
    return base, ref


@pytest.mark.parametrize(("case", "family"), PAIRS)
def test_peft_made_adapter_gives_peft_logits(case, family, tmp_path):
    base, ref = peft_made(case, family, tmp_path / "p")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "p")
    expected = logits(ref)
    assert (logits(ours) - expected).abs().max() <= 1e-5
    assert (expected - logits(base)).abs().max() > 1e-3


@pytest.mark.parametrize(("case", "family"), PAIRS)
def test_peftkit_made_adapter_gives_the_same_logits_in_peft(case, family, tmp_path):
    base, targets = build(family)
    ours = copy.deepcopy(base)
    apply_method(ours, CASES[case][1](targets))
    perturb(trainable_parameters(ours).values(), seed=8)
    expected = logits(ours)
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert (logits(ref) - expected).abs().max() <= 1e-5
    assert (expected - logits(base)).abs().max() > 1e-3

    again = copy.deepcopy(base)  # save -> load is bitwise
    load_adapter(again, tmp_path / "a")
    assert torch.equal(logits(again), expected) or case.startswith("ptuning")  # the encoder's output, once saved
    assert (logits(again) - expected).abs().max() <= 1e-6
    if case.startswith(MERGEABLE):
        merge(ours)
        assert (logits(ours) - expected).abs().max() <= 1e-5
        unmerge(ours)
        assert (logits(ours) - expected).abs().max() <= 1e-5
        merge_and_unload(ours)
        assert (logits(ours) - expected).abs().max() <= 1e-5
        assert not [n for n, _ in ours.named_modules() if "vera" in n or "lora" in n or "hada" in n or "updates" in n]


def test_vera_projections_are_peft_s_and_optional_in_the_file(tmp_path):
    from safetensors.torch import load_file

    base, targets = build("bert")
    for saved in (True, False):
        ours = copy.deepcopy(base)
        apply_method(ours, VeraConfig(r=4, target_modules=targets, save_projection=saved))
        save_adapter(ours, tmp_path / str(saved), base_model="tiny")
        keys = load_file(str(tmp_path / str(saved) / "adapter_model.safetensors"))
        assert ("base_model.vera_A" in keys and "base_model.vera_B" in keys) == saved
    ref = peft.get_peft_model(copy.deepcopy(base), CASES["vera"][0](targets, "bert"))
    assert torch.equal(ours.peftkit_vera.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(ours.peftkit_vera.vera_B, ref.base_model.vera_B["default"])


def _train_adalora_both(steps: int = 10):
    """The same AdaLoRA run in peft (its own update_and_allocate) and in peftkit (the schedule)."""
    base, targets = build("bert")
    common = {"init_r": 4, "target_r": 2, "total_step": steps, "tinit": 2, "tfinal": 3, "deltaT": 2}
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaLoraConfig(task_type=SEQ_CLS, lora_alpha=8, target_modules=targets, **common)
    )
    ours = copy.deepcopy(base)
    injection = apply_method(ours, AdaLoraConfig(alpha=8, target_modules=targets, **common))
    with torch.no_grad():  # peft's start, copied
        own = trainable_parameters(ours)  # by their paths in the file layout
        for name, p in ref.named_parameters():
            key = name.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")
            if p.requires_grad and key in own:
                own[key].copy_(p)
    labels = torch.tensor([0, 2])
    runs = []
    for model, schedule in ((ref, None), (ours, injection.schedule)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.eval()  # no dropout, so both see the same numbers (gradients flow all the same)
        losses = []
        for step in range(1, steps + 1):
            loss = model(input_ids=INPUT, attention_mask=MASK, labels=labels).loss
            if schedule is not None:
                loss = loss + schedule.penalty()  # peft adds it inside its forward
            loss.backward()
            opt.step()
            if schedule is None:
                model.base_model.update_and_allocate(step)
            else:
                schedule.after_step(step)
            opt.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    return ref, ours, base, runs


def test_adalora_prunes_ranks_as_peft_does_and_saves_only_the_kept_ones(tmp_path):
    ref, ours, base, (peft_losses, our_losses) = _train_adalora_both()
    assert our_losses == pytest.approx(peft_losses, abs=1e-5)
    assert our_losses[-1] < our_losses[0]
    pattern = {k.removeprefix("base_model.model."): v for k, v in ref.peft_config["default"].rank_pattern.items()}
    ours_pattern = ours.peftkit.method.kept_ranks(ours.peftkit, ours)
    assert ours_pattern == {k.replace(".default", ""): v for k, v in pattern.items()}
    assert sum(sum(v) for v in ours_pattern.values()) == 2 * len(ours_pattern)  # the target budget
    assert (logits(ours) - logits(ref)).abs().max() <= 1e-5

    save_adapter(ours, tmp_path / "a", base_model="tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ours_pattern
    from safetensors.torch import load_file

    shapes = {k: v.shape for k, v in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).items()}
    for name, kept in ours_pattern.items():
        assert shapes[f"base_model.model.{name}"] == (sum(kept), 1)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "a")
    assert (logits(back) - logits(ours)).abs().max() <= 1e-5
    assert (logits(again) - logits(ours)).abs().max() <= 1e-5

    ref.save_pretrained(str(tmp_path / "p"))  # and peft's pruned file in peftkit
    theirs = copy.deepcopy(base)
    load_adapter(theirs, tmp_path / "p")
    assert (logits(theirs) - logits(ref)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(r=4, alpha=8, target_modules=["query", "value"], rank_dropout=0.1, module_dropout=0.1),
        LoKrConfig(r=2, alpha=4, target_modules=["query", "value"]),
        VeraConfig(r=8, target_modules=["query", "value"], dropout=0.1),
        PTuningConfig(num_virtual_tokens=3),
        PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    ],
    ids=["loha", "lokr", "vera", "ptuning", "ptuning-lstm"],
)
def test_each_tuner_reduces_the_loss_on_the_tiny_classifier(config):
    torch.manual_seed(0)
    # virtual tokens go on LLaMA, which reads the last position (BERT's pooler would read a virtual one)
    base, _ = build("llama" if isinstance(config, PTuningConfig) else "bert")
    apply_method(base, config)
    opt = torch.optim.AdamW(trainable_parameters(base).values(), lr=2e-2)
    labels = torch.tensor([0, 2])

    def eval_loss() -> float:
        base.eval()
        with torch.no_grad():
            return base(input_ids=INPUT, attention_mask=MASK, labels=labels).loss.item()

    before = eval_loss()
    for step in range(60):
        base.train(step % 2 == 0)  # every other step with the model's and the method's dropouts
        loss = base(input_ids=INPUT, attention_mask=MASK, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


@pytest.mark.parametrize(
    ("case", "key", "value"),
    [
        ("vera", "bias", "all"),
        ("vera", "some_future_option", 3),
        ("loha", "use_effective_conv2d_x", True),
        ("lokr", "layers_pattern_x", "h"),
        ("adalora", "use_dora", True),
        ("adalora", "loftq_config", {"bits": 4}),
        ("ptuning", "encoder_reparameterization_type", "GRU"),
    ],
)
def test_options_peftkit_does_not_reproduce_are_refused_on_one_line(case, key, value, tmp_path):
    base, _ = peft_made(case, "bert", tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(PeftkitError, match=key) as err:
        load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("ia3", "layers_to_transform", [0]),
        ("prompt", "num_transformer_submodules_x", 2),
        ("prefix", "some_future_option", "x"),
    ],
)
def test_the_allow_list_covers_ia3_prompt_and_prefix_configs(kind, key, value, tmp_path):
    from peftkit.methods import METHODS, PEFT_TYPES

    cfg = {
        "ia3": {"peft_type": "IA3", "target_modules": ["query"], "feedforward_modules": []},
        "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
        "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2},
    }[kind]
    name = PEFT_TYPES[cfg["peft_type"]]
    METHODS[name].config.from_peft(cfg)  # reads as it is
    with pytest.raises(PeftkitError, match=key):
        METHODS[name].config.from_peft({**cfg, key: value})


@pytest.mark.parametrize("bits", [8, 4])
def test_every_tuner_trains_on_a_quantized_base(bits):
    pytest.importorskip("bitsandbytes")
    from peftkit.config import QuantizationConfig
    from peftkit.quantize import quantize_model

    for case in ("vera", "loha", "lokr", "adalora", "ptuning"):
        base, targets = build("bert")
        quantize_model(base, QuantizationConfig(bits=bits), skip=["classifier"])
        apply_method(base, CASES[case][1](targets))
        base.train()
        base(input_ids=INPUT, attention_mask=MASK, labels=torch.tensor([0, 2])).loss.backward()
        grads = [p.grad for p in trainable_parameters(base).values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), case
        assert any(g.abs().sum() > 0 for g in grads), case


@pytest.mark.parametrize("case", ["vera", "loha", "lokr", "adalora"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_all_linear_targets_both_ways(case, family, tmp_path):
    """A second target set: peft's own all-linear one way, peftkit's (stored as the layers it chose) the other."""
    base, _ = build(family)
    ref = peft.get_peft_model(copy.deepcopy(base), CASES[case][0]("all-linear", family))
    perturb([p for p in ref.parameters() if p.requires_grad], seed=3)
    ref.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "p")
    assert (logits(ours) - logits(ref)).abs().max() <= 1e-5

    mine = copy.deepcopy(base)
    injection = apply_method(mine, CASES[case][1]("all-linear"))
    assert len(injection.replaced) > 6 and not any(n.endswith(("classifier", "score")) for n in injection.replaced)
    perturb(trainable_parameters(mine).values(), seed=4)
    save_adapter(mine, tmp_path / "a", base_model="tiny")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert (logits(back) - logits(mine)).abs().max() <= 1e-5
