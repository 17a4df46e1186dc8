"""A peftkit LoRA model trains inside transformers.Trainer, for users who prefer it."""

from __future__ import annotations

import torch

from peftkit import LoraConfig, apply_method, load_adapted_classifier, save_adapter

from .conftest import sentiment_rows


def test_lora_model_in_transformers_trainer(tiny_bert_dir, tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    apply_method(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def encode(rows):
        return [{**tok(r["text"]), "labels": int(r["label"] == "positive")} for r in rows]

    train, test = encode(sentiment_rows(320, seed=1)), sentiment_rows(80, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=16,
        num_train_epochs=4,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok)).train()

    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    assert all(not torch.equal(p, trainable_before[n]) for n, p in model.named_parameters() if p.requires_grad)

    save_adapter(
        model, tmp_path / "adapter", base_model=str(tiny_bert_dir), meta={"id2label": {0: "negative", 1: "positive"}}
    )
    clf = load_adapted_classifier(tmp_path / "adapter")
    probs, _ = clf.predict_proba([r["text"] for r in test])
    accuracy = (probs.argmax(-1) == torch.tensor([int(r["label"] == "positive") for r in test]).numpy()).mean()
    assert accuracy >= 0.9
