"""How much the zero-shot label-scoring figure of SmolLM2 depends on the label words and the prompt.

Same test reviews and scoring as bench/smollm2_sentiment.py; no training. Prints one line per variant.

    .venv/bin/python bench/smollm2_zero_shot_prompts.py
"""

from pathlib import Path

import numpy as np

from peftkit.causal import LMEncoder, to_rows
from peftkit.config import load_recipe
from peftkit.data import encode_labels, load_splits
from peftkit.evaluate import label_probs
from peftkit.models import load_causal_lm

cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-sentiment-lora.yaml")
splits = load_splits(cfg.dataset, cfg.data, cfg.seed, convert=to_rows)
base = load_causal_lm(cfg.model)
tok = base.tokenizer
test = splits["test"]
names = ["negative", "positive"]
classes = encode_labels(test, names, "t")


def run(tag, data_over, label_words):
    d = cfg.data.model_copy(update=data_over)
    enc = LMEncoder(tok, d, label_words)
    e = enc.encode_split(test, "t", classes)
    pr = label_probs(base.model, e.prompts, enc.label_tokens, tok.pad_token_id, 32)
    acc = (pr.argmax(1) == np.array(classes)).mean()
    print(
        tag,
        [tok.decode([t]) for t in enc.label_tokens],
        "acc",
        round(acc, 4),
        "pred-pos-rate",
        round(pr.argmax(1).mean(), 3),
        flush=True,
    )


run("lower", {}, names)
run("Capital", {}, ["Negative", "Positive"])
run("lower, another system prompt", {"system_prompt": "You are a helpful assistant."}, names)
run(
    "lower, answer-with-one-word",
    {"prompt_template": "Review: {text}\nIs this review positive or negative? Answer with one word."},
    names,
)
