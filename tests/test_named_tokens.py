"""Prompt and prefix adapters by name beside LoRA ones on one base (peftkit.methods.named_tokens)."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit.adapter_io import read_adapter, read_adapter_weights
from peftkit.errors import PeftkitError
from peftkit.methods import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    apply_method,
    load_adapter,
    save_adapter,
    trainable_parameters,
)

from .test_named import INPUT, MASK, build, forward, load_named, perturb

peft = pytest.importorskip("peft")

METHODS = {
    "lora": LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "prefix": PrefixTuningConfig(num_virtual_tokens=5),
}


def saved(base, folder, method, seed: int, task: str = "classification"):
    """``method`` on a copy of ``base`` with random non-zero weights (head included), saved; the model."""
    model = copy.deepcopy(base)
    apply_method(model, method)
    perturb(trainable_parameters(model).values(), seed)
    save_adapter(model, folder, base_model="tiny", task=task)
    return model.eval()


def test_prompt_and_prefix_adapters_share_a_base_with_lora(tmp_path):
    base, _ = build("bert")
    alone = {name: saved(base, tmp_path / name, m, seed) for seed, (name, m) in enumerate(METHODS.items(), 1)}
    named = load_named(base, {name: tmp_path / name for name in METHODS})
    base_logits = forward(base)
    expected = {name: forward(m) for name, m in alone.items()}

    for name in METHODS:
        named.set_active(name)
        got = forward(named.model)
        assert (got - expected[name]).abs().max() <= 1e-5
        assert (got - base_logits).abs().max() > 1e-2
    named.disable()
    assert torch.equal(forward(named.model), base_logits)

    rows = ["prompt", "lora", None, "prefix"]
    with torch.no_grad():
        got = named.forward_rows(rows, input_ids=INPUT, attention_mask=MASK)
    for i, name in enumerate(rows):
        want = expected[name][i] if name else base_logits[i]
        assert (got[i] - want).abs().max() <= 1e-5, (i, name)
    with pytest.raises(PeftkitError, match="cannot share a forward pass"), named.per_row(rows):
        pass
    with named.per_row(["prompt"] * 4):  # rows of one prompt adapter do share a pass
        assert (forward(named.model) - expected["prompt"]).abs().max() <= 1e-5

    named.delete("prefix")
    assert named.model.config._attn_implementation != "peftkit_prefix"
    named.set_active("prompt")
    assert (forward(named.model) - expected["prompt"]).abs().max() <= 1e-5
    named.delete("prompt")
    assert not named.model._forward_pre_hooks
    named.set_active("lora")
    assert (forward(named.model) - expected["lora"]).abs().max() <= 1e-5


def test_peft_prompt_adapter_by_name_matches_peft(tmp_path):
    base, _ = build("bert")
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4)
    )
    perturb([p for p in theirs.parameters() if p.requires_grad], 5)
    theirs.save_pretrained(tmp_path / "p")
    saved(base, tmp_path / "lora", METHODS["lora"], 6)
    named = load_named(base, {"p": tmp_path / "p", "l": tmp_path / "lora"})
    named.set_active("p")
    assert (forward(named.model).softmax(-1) - forward(theirs).softmax(-1)).abs().max() <= 1e-5


def test_decoder_prompt_and_prefix_adapters_generate_as_alone(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit.generation import generate
    from peftkit.multi import generate_rows
    from peftkit.multi import load_named as load_folders

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    methods = {
        "lora": LoraConfig(r=4, alpha=16, target_modules="all-linear"),
        "prompt": PromptTuningConfig(num_virtual_tokens=3),
        "prefix": PrefixTuningConfig(num_virtual_tokens=4),
    }
    alone = {}
    for seed, (name, method) in enumerate(methods.items(), 3):
        model = copy.deepcopy(base)
        apply_method(model, method)
        for k in range(4):  # strong enough to change the greedy tokens
            perturb(trainable_parameters(model).values(), seed * 10 + k)
        save_adapter(model, tmp_path / name, base_model=str(tiny_llama_dir), task="causal_lm")
        alone[name] = model.eval()
    named = load_folders([(n, tmp_path / n) for n in methods])
    prompts = ["hello how are you", "is it good ?", "review : fun", "hello"]
    rows = ["prefix", "lora", "prompt", "prefix"]
    ids = [named.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    got = generate_rows(named, prompts, rows, raw=True, max_new_tokens=6)
    for i, name in enumerate(rows):
        want = generate(alone[name], named.tokenizer, [ids[i]], max_new_tokens=6)[0]
        assert got[i] == want, (i, name)
    assert len(set(got[:3])) == 3  # the adapters really differ

    with torch.no_grad():  # token-level logits: the real tokens', whatever adapter
        batch = torch.tensor([ids[2][:3], ids[1][:3]])
        mixed = named.adapters.forward_rows(["prompt", "lora"], input_ids=batch)
        assert mixed.shape[:2] == (2, 3)
        assert (mixed[0] - alone["prompt"](input_ids=batch[:1]).logits[0, 3:]).abs().max() <= 1e-4


def test_methods_that_change_every_row_are_still_refused(tmp_path):
    from peftkit.methods import BottleneckConfig

    base, _ = build("bert")
    saved(base, tmp_path / "lora", METHODS["lora"], 1)
    named = load_named(base, {"l": tmp_path / "lora"})
    with pytest.raises(PeftkitError, match="cannot share a base") as err:
        named.add("b", BottleneckConfig(), {})
    assert "\n" not in str(err.value)
    files = read_adapter(tmp_path / "lora")
    saved(base, tmp_path / "prompt", METHODS["prompt"], 2)
    state = read_adapter_weights(tmp_path / "prompt", read_adapter(tmp_path / "prompt").method_config())
    state["prompt_embeddings"] = state["prompt_embeddings"][:, :7]
    with pytest.raises(PeftkitError, match="7 wide"):
        named.add("p", read_adapter(tmp_path / "prompt").method_config(), state)
    assert named.names == ["l"] and not named.model._forward_pre_hooks
    assert files.method_config().name == "lora"


def test_load_adapter_still_works_after_the_hook_refactor(tmp_path):
    """The single-adapter prompt and prefix paths share the hooks' pieces with the named ones."""
    base, _ = build("bert")
    for seed, name in enumerate(("prompt", "prefix"), 1):
        model = saved(base, tmp_path / name, METHODS[name], seed)
        again = copy.deepcopy(base)
        load_adapter(again, tmp_path / name)
        assert torch.equal(forward(again), forward(model))


def test_cli_predict_mixes_prompt_prefix_and_lora_rows(tiny_bert_dir, tmp_path):
    import json

    from transformers import AutoModelForSequenceClassification

    from peftkit.cli import main
    from peftkit.multi import load_adapted_classifier

    labels = {"lora": ["negative", "positive"], "prompt": ["no", "yes", "maybe"], "prefix": ["bad", "good"]}
    for seed, (name, method) in enumerate(METHODS.items(), 1):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(labels[name]))
        apply_method(model, method)
        perturb(trainable_parameters(model).values(), seed)
        save_adapter(
            model,
            tmp_path / name,
            base_model=str(tiny_bert_dir),
            meta={"id2label": dict(enumerate(labels[name])), "max_length": 32},
        )
    texts = ["the movie was great", "a dull and boring plot", "quite fun", "awful acting", "a fine film"]
    rows = [{"text": t, "adapter": a} for t, a in zip(texts, ["prompt", "lora", "prefix", "prompt", "lora"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "predict",
                *[a for n in METHODS for a in ("--adapter", f"{n}={tmp_path / n}")],
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, o in zip(rows, out):
        clf = load_adapted_classifier(tmp_path / row["adapter"])
        want = clf.predict_proba([row["text"]])[0][0]
        assert o["adapter"] == row["adapter"] and list(o["scores"]) == labels[row["adapter"]]
        assert max(abs(o["scores"][n] - float(p)) for n, p in zip(labels[row["adapter"]], want)) <= 1e-5
