"""DoRA, the PiSSA/OLoRA/gaussian inits, rank and alpha patterns, layers_to_transform and lora_bias,
both ways against peft 0.21.2 (random non-zero weights; BERT, LLaMA and GPT-2's Conv1D)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftkit import AdaptedLinear, LoraConfig, apply_method, load_adapter, save_adapter
from peftkit.errors import PeftkitError
from peftkit.methods import merge, trainable_parameters, unmerge

from .conftest import tiny_bert_config
from .test_interop_peft import INPUT, MASK, logits, perturb

peft = pytest.importorskip("peft")


def build(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(tiny_bert_config(num_labels=3)), ["query", "value", "dense"]
    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            num_labels=3,
            pad_token_id=0,
        )
        return tf.LlamaForSequenceClassification(cfg), ["q_proj", "v_proj", "down_proj"]
    cfg = tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0)
    return tf.GPT2ForSequenceClassification(cfg), ["c_attn", "c_fc"]


#: case -> (peft LoraConfig options, the same in a peftkit recipe); ``{v}``/``{q}`` name a target
CASES = {
    "dora": {"use_dora": True},
    "dora-rslora": {"use_dora": True, "use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa-dora": {"init_lora_weights": "pissa", "use_dora": True},
    "olora": {"init_lora_weights": "olora"},
    "gaussian": {"init_lora_weights": "gaussian"},
    "patterns": {"rank_pattern": {"{v}": 2}, "alpha_pattern": {"{q}": 3.0}},
    "layers": {"layers_to_transform": [1]},
    "bias": {"lora_bias": True},
}
FAMILIES = ["bert", "llama", "gpt2"]
PAIRS = [(c, f) for c in CASES for f in FAMILIES if not (c == "olora" and f == "gpt2")]


def options(case: str, targets: list[str]) -> dict:
    opts = copy.deepcopy(CASES[case])
    for key in ("rank_pattern", "alpha_pattern"):
        if key in opts:
            opts[key] = {k.format(q=targets[0], v=targets[-1]): v for k, v in opts[key].items()}
    return opts


def peft_made(family: str, case: str, folder):
    base, targets = build(family)
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=4,
            lora_alpha=8,
            target_modules=targets,
            fan_in_fan_out=family == "gpt2",
            **options(case, targets),
        ),
    )
    perturb([p for p in ref.parameters() if p.requires_grad], seed=7)
    ref.save_pretrained(str(folder))
    return base, ref


def ours_made(family: str, case: str):
    base, targets = build(family)
    opts = options(case, targets)
    ours = copy.deepcopy(base)
    apply_method(ours, LoraConfig(r=4, alpha=8, target_modules=targets, **opts))
    perturb(trainable_parameters(ours).values(), seed=8)
    return base, ours


@pytest.mark.parametrize(("case", "family"), PAIRS)
def test_peft_made_adapter_gives_peft_logits(case, family, tmp_path):
    base, ref = peft_made(family, case, tmp_path / "p")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "p")
    expected = logits(ref)
    assert (logits(ours) - expected).abs().max() <= 1e-5
    assert (expected - logits(base)).abs().max() > 1e-3


@pytest.mark.parametrize(("case", "family"), PAIRS)
def test_peftkit_made_adapter_gives_the_same_logits_in_peft(case, family, tmp_path):
    base, ours = ours_made(family, case)
    expected = logits(ours)
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert (logits(ref) - expected).abs().max() <= 1e-5
    assert (expected - logits(base)).abs().max() > 1e-3

    again = copy.deepcopy(base)  # save -> load is bitwise
    load_adapter(again, tmp_path / "a")
    assert all(
        torch.equal(a, b) for a, b in zip(trainable_parameters(again).values(), trainable_parameters(ours).values())
    )
    assert torch.equal(logits(again), expected)

    if case != "bias" or family != "llama":  # LLaMA's projections have no bias to merge lora_bias into
        merge(ours)
        assert (logits(ours) - expected).abs().max() <= 1e-5
        unmerge(ours)
        assert (logits(ours) - expected).abs().max() <= 1e-5


def test_layers_to_transform_and_patterns_choose_layers_and_ranks():
    base, _ = build("llama")
    apply_method(
        base,
        LoraConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 2.0},
        ),
    )
    layers = {n: m.updates["default"] for n, m in base.named_modules() if isinstance(m, AdaptedLinear)}
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert layers["model.layers.1.self_attn.v_proj"].r == 2 and layers["model.layers.1.self_attn.v_proj"].scaling == 4.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 0.5


def test_pissa_starts_where_the_base_is_and_converts_to_plain_lora(tmp_path):
    base, ours = ours_made("bert", "pissa")
    fresh = copy.deepcopy(base)
    apply_method(fresh, LoraConfig(r=4, alpha=8, target_modules=["query"], init_lora_weights="pissa"))
    assert (logits(fresh) - logits(base)).abs().max() <= 1e-5  # residual + s B0 A0 = W

    expected = logits(ours)
    save_adapter(ours, tmp_path / "plain", base_model="tiny", plain_lora=True)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))
    assert (logits(ref) - expected).abs().max() <= 1e-5
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "plain")
    assert (logits(again) - expected).abs().max() <= 1e-5


def test_pissa_niter_saves_as_plain_lora_and_peft_niter_adapters_are_refused(tmp_path):
    base, targets = build("bert")
    ours = copy.deepcopy(base)
    torch.manual_seed(3)
    apply_method(ours, LoraConfig(r=4, alpha=8, target_modules=targets, init_lora_weights="pissa_niter_4"))
    perturb(trainable_parameters(ours).values(), seed=9)
    expected = logits(ours)
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] is True
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "a")
    assert (logits(again) - expected).abs().max() <= 1e-5

    peft_made("bert", "pissa", tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(PeftkitError, match="init_lora_weights='pissa_niter_4'"):
        load_adapter(copy.deepcopy(base), tmp_path / "p")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_qalora", True),
        ("loftq_config", {"loftq_bits": 4}),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "eva"),
        ("bias", "all"),
        ("layer_replication", [[0, 1]]),
        ("some_future_option", 3),
        ("use_bdlora", {"x": 1}),
    ],
)
def test_any_option_peftkit_does_not_reproduce_is_refused_on_one_line(key, value, tmp_path):
    base, _ = peft_made("bert", "dora", tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(PeftkitError, match=key) as err:
        load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert "\n" not in str(err.value)


def test_dora_on_a_quantized_base_uses_the_dequantized_weight(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peftkit.config import QuantizationConfig
    from peftkit.quantize import dequantize_model, quantize_model

    base, ours = ours_made("bert", "dora")
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    quantized = copy.deepcopy(base)
    quantize_model(quantized, QuantizationConfig(bits=8), skip=["classifier"])
    load_adapter(quantized, tmp_path / "a")
    plain = copy.deepcopy(quantized)
    dequantize_model(plain)  # the same rounded weights, as float32 layers
    assert (logits(quantized) - logits(plain)).abs().max() <= 1e-3
    assert (logits(quantized) - logits(ours)).abs().max() <= 5e-2


def test_dora_and_pissa_train_on_the_tiny_classifier():
    for case in ("dora", "pissa", "bias"):
        base, targets = build("bert")
        apply_method(base, LoraConfig(r=4, alpha=8, target_modules=targets, **CASES[case]))
        params = list(trainable_parameters(base).values())
        opt = torch.optim.AdamW(params, lr=1e-2)
        labels = torch.tensor([0, 2])
        base.train()
        losses = []
        for _ in range(40):
            loss = base(input_ids=INPUT, attention_mask=MASK, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (case, losses)


def test_bad_lora_options_are_one_line():
    from peftkit.config import build_config

    for method, fix in (
        ({"name": "lora", "use_dora": True, "lora_bias": True}, "lora_bias"),
        ({"name": "lora", "init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"name": "ia3", "use_dora": True}, "use_dora. is a LoRA option; method ia3"),
    ):
        with pytest.raises(PeftkitError, match=fix) as err:
            build_config({"method": method})
        assert "\n" not in str(err.value)


def test_loraplus_gives_the_b_factors_their_own_lr():
    from peftkit.prepare import param_groups

    base, targets = build("bert")
    apply_method(base, LoraConfig(r=4, target_modules=targets, use_dora=True))
    groups = param_groups(base, 1e-3, 5e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in base.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)].rsplit(".", 2)[-2] for p in g["params"]) for g in groups}
    assert set(by_lr) == {1e-3, 16e-3, 5e-3}
    assert set(by_lr[16e-3]) == {"lora_B"}
    assert "lora_B" not in by_lr[1e-3] and "classifier" in by_lr[5e-3]


@pytest.mark.parametrize(
    "options",
    [
        ["method.use_dora=true", "train.loraplus_lr_ratio=4"],
        ["method.init_lora_weights=pissa", "method.rank_pattern={value: 2}"],
    ],
)
def test_dora_loraplus_and_pissa_runs_train_save_and_predict(options, tuned_bert_dir, sentiment_dir, tmp_path):
    from peftkit import load_recipe
    from peftkit.multi import load_adapted_classifier
    from peftkit.train import train

    from .conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, tuned_bert_dir, sentiment_dir)
    before = train(
        load_recipe(recipe, [*options, "train.max_steps=1", "train.lr=1e-9", f"output_dir={tmp_path / 'before'}"]),
        echo=lambda _: None,
    )
    after = train(load_recipe(recipe, [*options, "train.epochs=3"]), echo=lambda _: None)
    assert after["validation"]["loss"] < before["validation"]["loss"]
    clf = load_adapted_classifier(tmp_path / "run" / "adapter")
    probs, _ = clf.predict_proba(["a great film", "a dull plot"])
    assert probs.shape == (2, 2)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == ("method.use_dora=true" in options)


def test_named_adapters_take_dora_and_refuse_residual_inits_and_combine_refuses_variants(tmp_path, capsys):
    from peftkit.adapter_io import read_adapter, read_adapter_weights
    from peftkit.methods.named import NamedAdapters

    from .test_errors import expect_error

    base, ours = ours_made("bert", "dora")
    save_adapter(ours, tmp_path / "dora", base_model="tiny")
    _, plain = ours_made("bert", "layers")
    save_adapter(plain, tmp_path / "plain", base_model="tiny")

    files = read_adapter(tmp_path / "dora")
    named = NamedAdapters(copy.deepcopy(base))
    named.add("d", files.method_config(), read_adapter_weights(tmp_path / "dora", files.method_config()))
    named.set_active("d")
    assert (logits(named.model) - logits(ours)).abs().max() <= 1e-5  # a DoRA adapter computes as it did alone
    pissa = LoraConfig(r=4, target_modules=["query"], init_lora_weights="pissa", rank_pattern={"query": 2})
    with pytest.raises(PeftkitError, match="init_lora_weights=pissa cannot share a base") as err:
        named.add("p", pissa, {})  # a pattern beside the residual init must not hide it
    assert "\n" not in str(err.value) and named.names == ["d"]
    named.delete("d")
    assert named.names == []
    capsys.readouterr()
    expect_error(
        capsys,
        [
            "combine",
            "--adapter",
            f"a={tmp_path / 'dora'}",
            "--adapter",
            f"b={tmp_path / 'plain'}",
            "--weights",
            "0.5,0.5",
            "--output",
            str(tmp_path / "out"),
        ],
        "uses use_dora",
    )
    assert not (tmp_path / "out").exists()
