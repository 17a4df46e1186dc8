"""Target matching with PEFT's target_modules semantics."""

from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, PeftkitError, apply_method
from peftkit.inject import linear_layer_names, select_targets

from .conftest import tiny_bert_config


@pytest.fixture
def bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=2))


def test_suffix_list(bert):
    names = select_targets(bert, ["query", "value"])
    assert names == [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2) for k in ("query", "value")]


def test_suffix_needs_a_whole_name_part(bert):
    # "ue" is the end of "value" but not a whole name part, so nothing matches
    with pytest.raises(PeftkitError):
        select_targets(bert, ["ue"])


def test_regex_is_a_full_match(bert):
    names = select_targets(bert, r".*layer\.1\..*(query|key)")
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    with pytest.raises(PeftkitError):
        select_targets(bert, r"query")  # a regex must match the whole name


def test_all_linear_skips_heads(bert):
    names = select_targets(bert, "all-linear", skip=["classifier"])
    assert "classifier" not in names
    assert set(names) == set(linear_layer_names(bert)) - {"classifier"}
    assert "bert.pooler.dense" in names


def test_all_linear_skips_lm_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    names = select_targets(model, "all-linear")
    assert "lm_head" not in names
    assert "transformer.h.0.attn.c_attn" in names  # Conv1D layers are linear layers


def test_exclude_modules(bert):
    names = select_targets(bert, ["query", "value"], exclude_modules=["layer.0.attention.self.value"])
    assert "bert.encoder.layer.0.attention.self.value" not in names and len(names) == 3
    names = select_targets(bert, "all-linear", exclude_modules=r".*\.dense", skip=["classifier"])
    assert not any(n.endswith(".dense") for n in names)


def test_no_match_lists_the_linear_layers(bert):
    with pytest.raises(PeftkitError) as err:
        apply_method(bert, LoraConfig(target_modules=["q_proj"]))
    message = str(err.value)
    assert "q_proj" in message and "query" in message and "dense" in message
    assert "\n" not in message


def test_apply_returns_what_it_replaced(bert):
    inj = apply_method(bert, LoraConfig(target_modules=["key"]))
    assert inj.replaced == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]
    assert bert.peftkit is inj
