"""A classification adapter, merged, as an ONNX graph that ONNX Runtime runs without torch.

The folder holds ``model.onnx`` (float32; batch and sequence axes dynamic), optionally
``model.int8.onnx`` (ONNX Runtime's dynamic int8 quantization of the linear layers' weights),
``tokenizer.json``, ``labels.json`` (label names, length limit, pad id) and ``classify.py``, which
needs ``onnxruntime``, ``tokenizers`` and ``numpy`` alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL, INT8, SPEC, SCRIPT = "model.onnx", "model.int8.onnx", "labels.json", "classify.py"
#: the opset written; ONNX Runtime 1.17 and later run it
OPSET = 18


class _Logits(nn.Module):
    """The classifier as a function of its tensor inputs alone (positional, in ``names`` order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def write_onnx(model: nn.Module, tokenizer: Any, folder: Path, sample: list[str], max_length: int) -> list[str]:
    """Export ``model`` (plain transformers, float32, merged) to ``folder/model.onnx`` through
    ``torch.onnx.export`` (the ``torch.export`` path), traced on ``sample`` texts with every
    axis but the last one of the logits dynamic. Returns the graph's input names."""
    model.eval()
    batch = tokenizer(sample, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    rows, length = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(max_length, 2))
    with torch.no_grad():
        torch.onnx.export(
            _Logits(model, names).eval(),
            tuple(batch[n] for n in names),
            str(folder / MODEL),
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=(tuple({0: rows, 1: length} for _ in names),),  # one entry: the *tensors
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return names


def quantize_int8(folder: Path) -> None:
    """``model.int8.onnx``: ONNX Runtime's dynamic quantization (int8 weights of MatMul/Gemm,
    activations quantized per batch at run time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph is for static quantization
    try:
        quantize_dynamic(str(folder / MODEL), str(folder / INT8), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def write_runtime(folder: Path, tokenizer: Any, labels: list[str], max_length: int) -> None:
    """The tokenizer, the labels and ``classify.py`` beside the graph."""
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    spec = {"labels": labels, "max_length": max_length, "pad_id": int(tokenizer.pad_token_id or 0)}
    (folder / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
    shutil.copyfile(Path(__file__).with_name("run_onnx.py"), folder / SCRIPT)
