"""Adapters cross between peftkit and the peft library with the same logits (both ways)."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit import AdaptedLinear, LoraConfig, apply_method, load_adapter, save_adapter

from .conftest import tiny_bert_config

peft = pytest.importorskip("peft")


def build(family: str):
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37, num_labels=3)
    if family == "bert":
        return tf.BertForSequenceClassification(tiny_bert_config(num_labels=3)), ["query", "value"]
    if family == "roberta":
        cfg = tf.RobertaConfig(vocab_size=40, num_hidden_layers=2, max_position_embeddings=70, pad_token_id=1, **small)
        return tf.RobertaForSequenceClassification(cfg), ["query", "value"]
    if family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=37, num_labels=3, pad_token_id=0
        )
        return tf.DistilBertForSequenceClassification(cfg), ["q_lin", "v_lin"]
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0)
        return tf.GPT2ForSequenceClassification(cfg), ["c_attn"]
    raise ValueError(family)


FAMILIES = ["bert", "roberta", "distilbert", "gpt2"]
INPUT = torch.tensor([[2, 5, 9, 11, 13, 7, 3], [2, 17, 8, 3, 4, 4, 4]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_peftkit_adapter_loads_in_peft(family, tmp_path):
    base, targets = build(family)
    ours = copy.deepcopy(base)
    inj = apply_method(ours, LoraConfig(r=4, alpha=8, target_modules=targets))
    perturb([p for n, p in ours.named_parameters() if p.requires_grad], seed=1)
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    expected = logits(ours)

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    got = logits(ref)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - logits(base)).abs().max() > 1e-3  # the adapter really changed the model
    assert set(inj.modules_to_save) <= set(ref.peft_config["default"].modules_to_save)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_peftkit(family, tmp_path):
    base, targets = build(family)
    cfg = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2"
    )
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb([p for p in ref.parameters() if p.requires_grad], seed=2)
    ref.save_pretrained(str(tmp_path / "p"))
    expected = logits(ref)

    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "p")
    got = logits(ours)
    assert (got - expected).abs().max() <= 1e-5
    assert any(isinstance(m, AdaptedLinear) for m in ours.modules())


def test_all_linear_round_trip_through_peft(tmp_path):
    base, _ = build("roberta")
    ours = copy.deepcopy(base)
    apply_method(ours, LoraConfig(r=2, target_modules="all-linear", use_rslora=True))
    perturb([p for p in ours.parameters() if p.requires_grad], seed=3)
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert (logits(ref) - logits(ours)).abs().max() <= 1e-5


def test_peft_adapter_through_peftkit_predict(tiny_bert_dir, tmp_path):
    """A peft-trained classifier adapter, used with `peftkit predict` and no --model."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.cli import main

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    ref = peft.get_peft_model(
        base, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    perturb([p for p in ref.parameters() if p.requires_grad], seed=4)
    ref.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_bert_dir
    )

    texts = ["the movie was great", "a dull and boring plot"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ref.eval()
    with torch.no_grad():
        expected = ref(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(tmp_path / "p"),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    got = torch.tensor([[r["scores"]["LABEL_0"], r["scores"]["LABEL_1"]] for r in rows])
    assert (got - expected).abs().max() <= 1e-5
