"""Every encoder family the foundation issue names: load as a classifier, adapt, save, reload."""

from __future__ import annotations

import pytest
import torch

from peftkit import apply_method, load_adapted_classifier, save_adapter
from peftkit.methods import LoraConfig, default_modules_to_save
from peftkit.models import load_classifier

from .conftest import VOCAB, make_tokenizer

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=64
)


def base_config(family: str):
    import transformers as tf

    n = len(VOCAB)
    return {
        "bert": lambda: tf.BertConfig(vocab_size=n, **SMALL),
        "roberta": lambda: tf.RobertaConfig(vocab_size=n, pad_token_id=0, **{**SMALL, "max_position_embeddings": 70}),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=n, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, pad_token_id=0
        ),
        "electra": lambda: tf.ElectraConfig(vocab_size=n, embedding_size=16, **SMALL),
        "deberta-v2": lambda: tf.DebertaV2Config(vocab_size=n, pooler_hidden_size=32, **SMALL),
    }[family]()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "deberta-v2"])
def test_family_round_trip(family, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(base_config(family)).save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")

    loaded = load_classifier(str(tmp_path / "base"), ["neg", "neu", "pos"])
    keep = default_modules_to_save(loaded.model, loaded.newly_initialized)
    # every module the base checkpoint lacked is trained and saved with the adapter
    for name in loaded.newly_initialized:
        assert any(name == k or name.startswith(k + ".") for k in keep), (name, keep)
    inj = apply_method(loaded.model, LoraConfig(r=2, target_modules="all-linear"), keep)
    assert inj.replaced and not set(inj.replaced) & set(keep)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    save_adapter(
        loaded.model,
        tmp_path / "adapter",
        base_model=str(tmp_path / "base"),
        meta={"id2label": {0: "neg", 1: "neu", 2: "pos"}, "max_length": 32},
    )

    texts = ["the movie was great fun", "boring", "a dull film and a weak story really"]
    ref = load_adapted_classifier(tmp_path / "adapter")
    assert ref.label_names == ["neg", "neu", "pos"]
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    loaded.model.eval()
    with torch.no_grad():
        expected = loaded.model(**enc).logits.softmax(-1).numpy()
    got, _ = ref.predict_proba(texts)
    assert abs(got - expected).max() <= 1e-5
