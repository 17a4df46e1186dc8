"""Adapter files: PEFT key layout, save -> load == before, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit import LoraConfig, PeftkitError, apply_method, load_adapter_weights, read_adapter, save_adapter
from peftkit.adapter_io import read_adapter_weights

from .conftest import tiny_bert_config


def model(seed=0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=2, **kw)).eval()


def test_save_load_round_trip_and_layout(tmp_path):
    ours = model()
    apply_method(ours, LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(ours, tmp_path / "a", base_model="tiny", meta={"id2label": {0: "neg", 1: "pos"}})
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "peftkit.json"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["r"] == 4
    assert config["modules_to_save"] == ["classifier"] and config["base_model_name_or_path"] == "tiny"
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and len(keys) == 2 * 2 * 2 + 2

    fresh = model()
    files = read_adapter(tmp_path / "a")
    method = files.method_config()
    apply_method(fresh, method, method.modules_to_save)
    load_adapter_weights(fresh, tmp_path / "a")
    ids = torch.randint(5, 30, (2, 6))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert files.meta["id2label"] == {"0": "neg", "1": "pos"}


def test_shape_mismatch_is_refused(tmp_path):
    ours = model()
    apply_method(ours, LoraConfig(r=4, target_modules=["query"]))
    save_adapter(ours, tmp_path / "a", base_model="tiny")
    wider = model(hidden_size=48)
    apply_method(wider, LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(PeftkitError, match="shape"):
        load_adapter_weights(wider, tmp_path / "a")


def test_not_an_adapter_and_damaged_weights(tmp_path):
    with pytest.raises(PeftkitError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftkitError, match="JSON"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PeftkitError, match="damaged"):
        read_adapter_weights(tmp_path)


def test_unsupported_peft_options_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_qalora": True}))
    with pytest.raises(PeftkitError, match="use_qalora"):
        read_adapter(tmp_path).method_config()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(PeftkitError, match="not valid .target_modules") as err:
        read_adapter(tmp_path).method_config()
    assert "\n" not in str(err.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT"}))
    with pytest.raises(PeftkitError, match="BOFT"):
        read_adapter(tmp_path).method_config()


def test_saving_replaces_atomically(tmp_path):
    ours = model()
    apply_method(ours, LoraConfig(r=2, target_modules=["key"]))
    save_adapter(ours, tmp_path / "a", base_model="one")
    save_adapter(ours, tmp_path / "a", base_model="two")
    assert read_adapter(tmp_path / "a").base_model == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporaries left
