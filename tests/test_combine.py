"""`peftkit combine` against peft's add_weighted_adapter, on LoRA adapters of BERT and LLaMA."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftkit.adapter_io import read_adapter_weights
from peftkit.cli import main
from peftkit.multi import combine_folders, parse_specs

from .conftest import tiny_bert_config
from .test_errors import expect_error
from .test_named import saved_classifier

peft = pytest.importorskip("peft")

INPUT = torch.tensor([[2, 5, 9, 11, 13, 7, 3], [2, 17, 8, 3, 4, 4, 4]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
TARGETS = {
    "bert": (["query", "value"], ["value", "key", "intermediate.dense"]),
    "llama": (["q_proj", "v_proj"], ["v_proj", "k_proj", "down_proj"]),
}
WEIGHTS = [0.7, -0.4]


def build(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
        )
    ).eval()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


@pytest.fixture(scope="module", params=["bert", "llama"])
def pair(request, tmp_path_factory):
    """peft adapters "first" (r 4), "second" (r 4, overlapping layers, alpha 16) and "third" (r 8),
    saved in one folder; the base; and the peft model holding them."""
    family = request.param
    base = build(family)
    first, second = TARGETS[family]
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=first), adapter_name="first"
    )
    ref.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=16, target_modules=second))
    ref.add_adapter("third", peft.LoraConfig(r=8, lora_alpha=8, target_modules=first))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp(f"pair-{family}")
    ref.save_pretrained(str(folder))
    return family, base, ref, folder


CASES = [
    ("linear", None, ["first", "second"]),
    ("cat", None, ["first", "third"]),
    ("svd", None, ["first", "third"]),
    ("ties", 0.5, ["first", "second"]),
    ("ties_svd", 0.6, ["first", "third"]),
    ("magnitude_prune", 0.5, ["first", "second"]),
    ("magnitude_prune_svd", 0.3, ["second", "third"]),
    ("dare_linear", 1.0, ["first", "second"]),
    ("dare_ties", 1.0, ["first", "second"]),
    ("linear", None, ["second"]),
]


@pytest.mark.parametrize("combination,density,names", CASES, ids=[f"{c}-{'-'.join(n)}" for c, _, n in CASES])
def test_combination_matches_peft(pair, combination, density, names, tmp_path):
    family, base, ref, folder = pair
    new = f"{combination}_{'_'.join(names)}"
    if new not in ref.peft_config:
        ref.add_weighted_adapter(names, WEIGHTS[: len(names)], new, combination_type=combination, density=density)
    ref.set_adapter(new)
    expected = logits(ref)

    specs = [(n, folder / n) for n in names]
    combine_folders(specs, WEIGHTS[: len(names)], combination, tmp_path / "c", density=density)
    ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "c"))
    got = logits(ours)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - logits(base)).abs().max() > 1e-3  # the combined adapter does something


def test_dare_masks_come_from_the_seed(pair, tmp_path):
    _, _, _, folder = pair
    specs = [(n, folder / n) for n in ("first", "second")]

    def made(seed: int, where: str) -> dict:
        combine_folders(specs, WEIGHTS, "dare_ties", tmp_path / where, density=0.5, seed=seed)
        return read_adapter_weights(tmp_path / where)

    a, b, c = made(3, "a"), made(3, "b"), made(4, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # at density 0.5 about half of an adapter's elements survive (the other adapter weighs 0 here)
    combine_folders(
        [("x", folder / "first"), ("y", folder / "first")],
        [1.0, 0.0],
        "dare_linear",
        tmp_path / "e",
        density=0.5,
        seed=1,
    )
    kept = read_adapter_weights(tmp_path / "e")
    frac = sum(int((t != 0).sum()) for t in kept.values()) / sum(t.numel() for t in kept.values())
    assert 0.4 < frac < 0.6


def test_classifier_heads_combine_with_the_weights(tiny_bert_dir, tmp_path):
    labels = ["negative", "positive"]
    saved_classifier(tiny_bert_dir, tmp_path / "a", labels, 1)
    saved_classifier(tiny_bert_dir, tmp_path / "b", labels, 2)
    heads = {n: read_adapter_weights(tmp_path / n) for n in ("a", "b")}
    combine_folders(parse_specs([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]), [0.25, 0.75], "linear", tmp_path / "c")
    got = read_adapter_weights(tmp_path / "c")
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(got[key], 0.25 * heads["a"][key] + 0.75 * heads["b"][key])
    meta = json.loads((tmp_path / "c" / "peftkit.json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"} and meta["combined"]["combination"] == "linear"
    assert (
        main(
            [
                "combine",
                "--adapter",
                f"a={tmp_path / 'a'}",
                "--adapter",
                f"b={tmp_path / 'b'}",
                "--weights",
                "0.5,0.5",
                "--head",
                "b",
                "--output",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert torch.equal(read_adapter_weights(tmp_path / "d")["classifier.weight"], heads["b"]["classifier.weight"])
    # the combined classifier is used like any other
    (tmp_path / "in.txt").write_text("the movie was great\n")
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(tmp_path / "d"),
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    assert set(json.loads((tmp_path / "p.jsonl").read_text())["scores"]) == {"negative", "positive"}


def test_bad_combinations_are_one_line_and_write_nothing(tiny_bert_dir, tiny_llama_dir, tmp_path, capsys):
    from peftkit.methods import IA3Config, apply_method, save_adapter

    saved_classifier(tiny_bert_dir, tmp_path / "a", ["negative", "positive"], 1)
    saved_classifier(tiny_bert_dir, tmp_path / "b", ["negative", "positive"], 2)
    saved_classifier(tiny_bert_dir, tmp_path / "three", ["x", "y", "z"], 3)
    saved_classifier(tiny_bert_dir, tmp_path / "r8", ["negative", "positive"], 4)
    cfg = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    state = read_adapter_weights(tmp_path / "r8")
    from peftkit.adapter_io import write_adapter

    big = {
        ("base_model.model." + k): (
            torch.cat([v, v])
            if k.endswith("lora_A.weight")
            else torch.cat([v, v], 1)
            if k.endswith("lora_B.weight")
            else v
        )
        for k, v in state.items()
    }
    write_adapter(tmp_path / "r8", {**cfg, "r": 8}, big, json.loads((tmp_path / "r8" / "peftkit.json").read_text()))
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply_method(lm, IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    save_adapter(lm, tmp_path / "ia3", base_model=str(tiny_llama_dir), task="causal_lm")
    a, b = f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"
    cases = [
        ([a, b], ["--weights", "1,2,3"], "3 weights for 2 adapters"),
        ([a, b], ["--weights", "1,1", "--combination", "ties", "--density", "0"], "needs a density in (0, 1]"),
        ([a, b], ["--weights", "1,1", "--combination", "ties", "--density", "1.5"], "needs a density in (0, 1]"),
        ([a, b], ["--weights", "1,1", "--combination", "ties"], "needs a density"),
        ([a, b], ["--weights", "x,1"], "are not numbers"),
        ([a, b], ["--weights", "1,1", "--combination", "nope"], "unknown combination"),
        ([a, f"c={tmp_path / 'three'}"], ["--weights", "1,1"], "label sets differ"),
        ([a, f"c={tmp_path / 'r8'}"], ["--weights", "1,1"], "needs adapters of one rank"),
        ([a, f"c={tmp_path / 'ia3'}"], ["--weights", "1,1"], "different tasks"),
        ([f"c={tmp_path / 'ia3'}"], ["--weights", "1"], "not LoRA"),
        ([a, a], ["--weights", "1,1"], "given twice"),
    ]
    capsys.readouterr()  # what building the adapters printed
    out = tmp_path / "out"
    for adapters, options, message in cases:
        expect_error(
            capsys,
            ["combine", *[x for s in adapters for x in ("--adapter", s)], *options, "--output", str(out)],
            message,
        )
        assert not out.exists()
    # different bases: the same layers with other shapes
    other = tmp_path / "other"
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta = json.loads((tmp_path / "a" / "peftkit.json").read_text())
    wide = {
        ("base_model.model." + k): (torch.zeros(v.shape[0], 64) if k.endswith("lora_A.weight") else v)
        for k, v in read_adapter_weights(tmp_path / "a").items()
    }
    write_adapter(other, cfg, wide, {**meta, "base_model": "another-base"})
    expect_error(
        capsys,
        ["combine", "--adapter", a, "--adapter", f"o={other}", "--weights", "1,1", "--output", str(out)],
        "different bases",
    )
    assert not out.exists()
