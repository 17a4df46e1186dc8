"""`peftkit merge` for causal-LM adapters: a plain ForCausalLM folder that transformers.pipeline runs,
greedy tokens equal to the unmerged adapter's; several adapters merged with weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftkit.adapter_io import read_adapter_weights
from peftkit.cli import main
from peftkit.methods import LoraConfig, PromptTuningConfig, apply_method, save_adapter

from .test_errors import expect_error

PROMPTS = ["hello how are you", "review : a fun and moving film positive or negative ?"]


def lm_adapter(base_dir, folder, seed: int, method=None, meta=None, scale: float = 0.3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_method(model, method or LoraConfig(r=4, alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, folder, base_model=str(base_dir), task="causal_lm", meta=meta)
    return folder


def unmerged_answers(adapter, max_new_tokens: int = 8) -> list[str]:
    from peftkit.generation import generate
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(adapter)
    return generate(
        lm.model,
        lm.tokenizer,
        [lm.prompt_ids(p, raw=True) for p in PROMPTS],
        max_new_tokens=max_new_tokens,
        stop_ids=lm.encoder.stop_ids,
    )


def test_merged_decoder_runs_in_pipeline_with_the_unmerged_greedy_answers(tiny_llama_dir, tmp_path, capsys):
    adapter = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    said = capsys.readouterr().out
    assert "text-generation" in said and "max abs logit difference" in said
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    tokenizer_files = "".join((tmp_path / "m" / f).read_text() for f in files if "tokenizer" in f or "chat" in f)
    assert "add_generation_prompt" in tokenizer_files  # the chat template travels with the model

    expected = unmerged_answers(adapter)
    assert any(expected)
    script = (
        "import json, sys\nfrom transformers import pipeline\n"
        f"pipe = pipeline('text-generation', model={str(tmp_path / 'm')!r})\n"
        f"out = [pipe(p, max_new_tokens=8, do_sample=False, return_full_text=False)[0]['generated_text'] "
        f"for p in {PROMPTS!r}]\n"
        "print(json.dumps(out))\n"
        "assert 'peftkit' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert [g.strip() for g in got] == [e.strip() for e in expected]


def test_several_adapters_merge_with_weights(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    b = lm_adapter(tiny_llama_dir, tmp_path / "b", 2)
    assert (
        main(
            [
                "merge",
                "--adapter",
                f"a={a}",
                "--adapter",
                f"b={b}",
                "--weights",
                "0.6,-0.5",
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    sa, sb = read_adapter_weights(a), read_adapter_weights(b)
    path = "model.layers.1.mlp.down_proj"
    scaling = 16 / 4
    expected = base[path + ".weight"] + scaling * (
        0.6 * sa[path + ".lora_B.weight"] @ sa[path + ".lora_A.weight"]
        - 0.5 * sb[path + ".lora_B.weight"] @ sb[path + ".lora_A.weight"]
    )
    assert (merged[path + ".weight"] - expected).abs().max() <= 1e-5


def test_merge_refusals_are_one_line_and_write_nothing(tiny_llama_dir, tmp_path, capsys):
    prompt = lm_adapter(tiny_llama_dir, tmp_path / "p", 1, method=PromptTuningConfig(num_virtual_tokens=2))
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    capsys.readouterr()  # what building the adapters printed
    out = tmp_path / "m"
    cases = [
        ([str(prompt)], [], "cannot be merged"),
        ([f"a={a}", f"b={a}"], [], "needs --weights"),
        ([str(a)], ["--weights", "1"], "--weights needs several adapters"),
        ([f"a={a}", f"b={a}"], ["--weights", "1,2,3"], "3 weights for 2 adapters"),
    ]
    for adapters, options, message in cases:
        expect_error(
            capsys, ["merge", *[x for s in adapters for x in ("--adapter", s)], *options, "--output", str(out)], message
        )
        assert not out.exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_merge_from_a_quantized_base_is_the_dequantized_base_plus_the_update(bits, tiny_llama_dir, tmp_path, capsys):
    """The merged folder equals the adapter run unmerged on the dequantized base (so the update
    was kept, not rounded away into int8 or 4-bit weights), and the move from the quantized model
    as loaded is reported."""
    from transformers import AutoModelForCausalLM

    from peftkit.methods.base import trainable_parameters
    from peftkit.multi import load_adapted_lm
    from peftkit.quantize import dequantize_model

    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    assert main(["merge", "--adapter", str(a), "--quantize", str(bits), "--output", str(tmp_path / "m")]) == 0
    said = capsys.readouterr().out
    diff = float(said.split("max abs logit difference from the model as loaded: ")[1].split(")")[0])
    assert diff > 0  # quantized compute differs from the float merged model: a number, not a pretence
    ids = torch.tensor([[5, 9, 12, 30, 31, 40, 2]])
    lm = load_adapted_lm(a, quantize=bits)
    dequantize_model(lm.model)  # the LoRA layers stay unmerged, now over float weights
    with torch.no_grad():
        want = lm.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
        base = load_adapted_lm(a, quantize=bits)
        dequantize_model(base.model)
        for p in trainable_parameters(base.model).values():
            p.zero_()  # LoRA B = 0: the dequantized base alone
        without = base.model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3  # float32 rounding on logits of about 10
    assert (got - without).abs().max() > 0.1  # and the update is a real one


def test_generate_merge_on_a_quantized_base_is_refused_on_one_line(tiny_llama_dir, tmp_path, capsys):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    expect_error(
        capsys,
        ["generate", "--adapter", str(a), "--quantize", "4", "--merge", "--prompt", "hello"],
        "--merge cannot fold the update into quantized weights",
    )


def test_merging_a_model_with_a_quantized_base_in_place_is_refused(tiny_llama_dir, tmp_path):
    from peftkit import PeftkitError
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(lm_adapter(tiny_llama_dir, tmp_path / "a", 1), quantize=8)
    with pytest.raises(PeftkitError, match="cannot merge into quantized weights"):
        lm.adapters.merge_and_unload(lm.name)
