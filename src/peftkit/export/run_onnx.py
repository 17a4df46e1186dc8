"""Classify texts with an exported peftkit classifier: ONNX Runtime, tokenizers and numpy only.

``peftkit export --format onnx`` copies this file beside ``model.onnx``, ``tokenizer.json`` and
``labels.json``; it imports nothing of torch, transformers or peftkit.

    python classify.py "a moving, funny film" "dull"           # texts as arguments
    python classify.py --input texts.jsonl --model model.int8.onnx   # {"text": ...} per line

Each text gives one JSON line: ``{"label": ..., "probs": {label: p, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


class Classifier:
    """The exported model and its tokenizer, set up as peftkit's ``predict`` tokenizes."""

    def __init__(self, folder: Path = HERE, model: str = "model.onnx", threads: int = 0):
        self.spec = json.loads((folder / "labels.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.spec["max_length"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / model), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def probabilities(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> np.ndarray:
        """``(len(texts), labels)`` softmax probabilities."""
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            items = list(zip(chunk, pairs[start : start + batch_size])) if pairs else chunk
            encoded = self.tokenizer.encode_batch(items)
            width = max(len(e.ids) for e in encoded)
            feed = {name: np.zeros((len(encoded), width), dtype=np.int64) for name in self.inputs}
            feed["input_ids"][:] = self.spec["pad_id"]
            for i, e in enumerate(encoded):
                n = len(e.ids)
                feed["input_ids"][i, :n] = e.ids
                if "attention_mask" in feed:
                    feed["attention_mask"][i, :n] = 1
                if "token_type_ids" in feed:
                    feed["token_type_ids"][i, :n] = e.type_ids
            logits = self.session.run(None, feed)[0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            rows.append(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
        return np.concatenate(rows).astype(np.float32)

    def classify(self, texts: list[str]) -> list[dict]:
        labels = self.spec["labels"]
        return [
            {"label": labels[int(p.argmax())], "probs": {n: round(float(v), 6) for n, v in zip(labels, p)}}
            for p in self.probabilities(texts)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--input", help="a JSONL file of {'text': ...} rows, or a text file with one text per line")
    parser.add_argument("--model", default="model.onnx", help="model.onnx, or model.int8.onnx")
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.input:
        for line in Path(args.input).read_text().splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line)
    if not texts:
        parser.error("give texts, or --input FILE")
    for row in Classifier(HERE, args.model).classify(texts):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
