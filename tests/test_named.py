"""Several named adapters on one base (peftkit.methods.named), against peft's own multi-adapter model."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit.adapter_io import read_adapter, read_adapter_weights
from peftkit.errors import PeftkitError
from peftkit.methods import IA3Config, LoraConfig, PromptTuningConfig
from peftkit.methods.layer import AdaptedLinear
from peftkit.methods.named import HeadBank, NamedAdapters

from .conftest import tiny_bert_config
from .test_errors import expect_error

peft = pytest.importorskip("peft")

INPUT = torch.tensor([[2, 5, 9, 11, 13, 7, 3], [2, 17, 8, 3, 4, 4, 4], [2, 6, 6, 10, 3, 0, 0], [2, 9, 3, 0, 0, 0, 0]])
MASK = (INPUT != 0).long()
MASK[1, 4:] = 0


def build(family: str, num_labels: int = 3):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(tiny_bert_config(num_labels=num_labels)), "classifier"
    cfg = tf.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return tf.LlamaForSequenceClassification(cfg), "score"


def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def forward(model, **kw) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK, **kw).logits


TARGETS = {
    "bert": (["query", "value"], ["query", "key", "dense"]),
    "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj", "down_proj"]),
}


def peft_pair(family: str, tmp_path):
    """A peft model holding LoRA adapters "first" (r 4) and "second" (r 8, other layers), each with its own
    trained head, saved as one multi-adapter folder; and the base it was built on."""
    base, head = build(family)
    first, second = TARGETS[family]
    task = peft.TaskType.SEQ_CLS
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=first),
        adapter_name="first",
    )
    ref.add_adapter("second", peft.LoraConfig(task_type=task, r=8, lora_alpha=4, target_modules=second))
    for name, seed in (("first", 1), ("second", 2)):
        perturb([p for n, p in ref.named_parameters() if f".{name}." in n or n.endswith(f".{name}")], seed)
    ref.save_pretrained(str(tmp_path / "p"))
    return base, ref


def load_named(base, folders: dict) -> NamedAdapters:
    model = copy.deepcopy(base)
    adapters = NamedAdapters(model)
    for name, folder in folders.items():
        files = read_adapter(folder)
        adapters.add(name, files.method_config(), read_adapter_weights(folder, files.method_config()))
    return adapters


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_named_adapters_match_peft_one_at_a_time_and_mixed(family, tmp_path):
    base, ref = peft_pair(family, tmp_path)
    # peft writes the first adapter at the folder's root only when it is named "default"
    folders = {"a": tmp_path / "p" / "first", "b": tmp_path / "p" / "second"}
    named = load_named(base, folders)
    model = named.model
    base_logits = forward(base)

    for name, mine in (("first", "a"), ("second", "b")):
        ref.set_adapter(name)
        expected = forward(ref)
        named.set_active(mine)
        got = forward(model)
        assert (got.softmax(-1) - expected.softmax(-1)).abs().max() <= 1e-5
        assert (got - base_logits).abs().max() > 1e-2  # the adapter and its head changed the output

    expected = forward(ref, adapter_names=["second", "first", "__base__", "second"])
    with named.per_row(["b", "a", None, "b"]):
        got = forward(model)
    assert (got.softmax(-1) - expected.softmax(-1)).abs().max() <= 1e-5
    assert torch.equal(got[2], base_logits[2]) or (got[2] - base_logits[2]).abs().max() <= 1e-6

    named.disable()
    assert torch.equal(forward(model), base_logits)
    named.set_active("a")
    with named.using(None):
        assert torch.equal(forward(model), base_logits)
    assert named.active == "a"


def test_heads_stay_with_their_adapter_and_widths_may_differ(tmp_path):
    """A 2-label and a 5-label adapter on one base: each row's scores are its own head's, in a mixed
    batch too (the narrower head's extra logits are -inf, so its softmax is its own)."""
    from peftkit.methods import apply_method, save_adapter

    singles = {}
    for name, labels, seed in (("two", 2, 3), ("five", 5, 4)):
        model, _ = build("bert", labels)
        apply_method(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
        perturb([p for p in model.parameters() if p.requires_grad], seed)
        save_adapter(model, tmp_path / name, base_model="tiny")
        singles[name] = forward(model)
    base, _ = build("bert", 2)
    named = load_named(base, {n: tmp_path / n for n in singles})
    for name, expected in singles.items():
        named.set_active(name)
        assert (forward(named.model) - expected).abs().max() <= 1e-5
    order = ["five", "two", "two", "five"]
    with named.per_row(order):
        got = forward(named.model)
    assert got.shape == (4, 5)
    for i, name in enumerate(order):
        width = singles[name].shape[-1]
        assert (got[i, :width] - singles[name][i]).abs().max() <= 1e-5
        assert torch.isinf(got[i, width:]).all()
        assert (got[i].softmax(-1)[:width] - singles[name][i].softmax(-1)).abs().max() <= 1e-6


def test_lora_and_ia3_share_layers(tmp_path):
    """An IA3 adapter and a LoRA adapter on the same linear layers: each row sees only its own."""
    from peftkit.methods import apply_method, save_adapter

    singles = {}
    for name, cfg, seed in (
        ("lora", LoraConfig(r=2, target_modules=["query", "value", "intermediate.dense"]), 5),
        (
            "ia3",
            IA3Config(
                target_modules=["value", "intermediate.dense", "output.dense"], feedforward_modules=["output.dense"]
            ),
            6,
        ),
    ):
        model, _ = build("bert")
        apply_method(model, cfg)
        perturb([p for p in model.parameters() if p.requires_grad], seed)
        save_adapter(model, tmp_path / name, base_model="tiny")
        singles[name] = forward(model)
    base, _ = build("bert")
    named = load_named(base, {n: tmp_path / n for n in singles})
    with named.per_row(["ia3", "lora", None, "ia3"]):
        got = forward(named.model)
    expected = torch.stack([singles["ia3"][0], singles["lora"][1], forward(base)[2], singles["ia3"][3]])
    assert (got - expected).abs().max() <= 1e-5


def test_delete_leaves_the_others_and_memory_is_the_adapters_own(tmp_path):
    base, ref = peft_pair("bert", tmp_path)
    named = load_named(base, {"a": tmp_path / "p" / "first", "b": tmp_path / "p" / "second"})
    base_params = sum(p.numel() for p in base.parameters())
    bank_params = sum(p.numel() for p in named.model.parameters())
    heads = sum(p.numel() for m in named.model.modules() if isinstance(m, HeadBank) for p in m.copies.parameters())
    factors = sum(
        p.numel() for m in named.model.modules() if isinstance(m, AdaptedLinear) for p in m.updates.parameters()
    )
    assert factors > 0 and bank_params == base_params + heads + factors  # nothing of the base is copied
    assert not any(
        p.requires_grad for m in named.model.modules() if isinstance(m, AdaptedLinear) for p in m.updates.parameters()
    )
    named.delete("a")
    assert named.names == ["b"]
    ref.set_adapter("second")
    named.set_active("b")
    assert (forward(named.model).softmax(-1) - forward(ref).softmax(-1)).abs().max() <= 1e-5
    named.delete("b")
    assert torch.equal(forward(named.model), forward(base))
    assert not any(isinstance(m, AdaptedLinear) for m in named.model.modules())


def test_bad_names_and_methods_are_refused_on_one_line(tmp_path):
    base, ref = peft_pair("bert", tmp_path)
    named = load_named(base, {"a": tmp_path / "p" / "first"})
    folder = tmp_path / "p" / "second"
    files = read_adapter(folder)
    state = read_adapter_weights(folder, files.method_config())
    with pytest.raises(PeftkitError, match="already loaded"):
        named.add("a", files.method_config(), state)
    with pytest.raises(PeftkitError, match="not allowed"):
        named.add("a b/..", files.method_config(), state)
    with pytest.raises(PeftkitError, match="holds no 2 x D 'prompt_embeddings'"):
        named.add("p", PromptTuningConfig(num_virtual_tokens=2), {})
    with pytest.raises(PeftkitError, match="no adapter named 'c'"), named.per_row(["a", "c"]):
        pass
    with pytest.raises(PeftkitError, match="no adapter named"):
        named.set_active("b")
    bad = {k: (v[:, :3] if k.endswith("lora_A.weight") else v) for k, v in state.items()}
    with pytest.raises(PeftkitError, match="do not fit"):
        named.add("b", files.method_config(), bad)
    assert named.names == ["a"]  # nothing half-added
    with pytest.raises(PeftkitError, match="an adapter named 'a' is already loaded") as caught:
        named.add("a", files.method_config(), state)
    assert "\n" not in str(caught.value)


# ---- the CLI: predict / eval / generate with NAME=DIR adapters ----
def saved_classifier(base_dir, folder, labels: list[str], seed: int, targets=("query", "value")):
    """A LoRA classifier adapter of ``base_dir`` with its own head and label names, and the model it is."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.methods import apply_method, save_adapter

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(labels))
    apply_method(model, LoraConfig(r=4, alpha=8, target_modules=list(targets)))
    perturb([p for p in model.parameters() if p.requires_grad], seed)
    save_adapter(model, folder, base_model=str(base_dir), meta={"id2label": dict(enumerate(labels)), "max_length": 32})
    return model.eval()


def test_cli_predict_routes_each_row_to_its_adapter(tiny_bert_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    from peftkit.cli import main

    models = {
        "mood": saved_classifier(tiny_bert_dir, tmp_path / "mood", ["negative", "positive"], 1),
        "genre": saved_classifier(
            tiny_bert_dir, tmp_path / "genre", ["drama", "comedy", "horror"], 2, ("query", "key", "dense")
        ),
    }
    rows = [
        {"id": "r1", "text": "the movie was great", "adapter": "genre"},
        {"id": 7, "text": "a dull and boring plot"},  # no adapter field: the first one given
        {"text": "quite fun", "adapter": "mood"},
        {"text": "awful acting and a weak story that was very tedious", "adapter": "genre"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "predict",
        "--adapter",
        f"mood={tmp_path / 'mood'}",
        "--adapter",
        f"genre={tmp_path / 'genre'}",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--batch-size",
        "3",
    ]
    assert main(args) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o.get("id") for o in out] == ["r1", 7, None, None]
    assert [o["adapter"] for o in out] == ["genre", "mood", "mood", "genre"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for row, o in zip(rows, out):
        model = models[o["adapter"]]
        with torch.no_grad():
            expected = model(**tok([row["text"]], return_tensors="pt")).logits.softmax(-1)[0]
        names = ["negative", "positive"] if o["adapter"] == "mood" else ["drama", "comedy", "horror"]
        got = torch.tensor([o["scores"][n] for n in names])
        assert list(o["scores"]) == names
        assert (got - expected).abs().max() <= 1e-5
        assert o["label"] == names[int(expected.argmax())]

    # per-adapter metrics with eval
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": "positive"}) + "\n" for r in rows))
    assert (
        main(
            [
                "eval",
                "--adapter",
                f"mood={tmp_path / 'mood'}",
                "--data",
                str(data),
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["adapters"]) == {"mood"} and result["adapters"]["mood"]["n"] == 4


def test_cli_bad_named_input_is_one_line_and_writes_nothing(tiny_bert_dir, tmp_path, capsys):
    import json

    saved_classifier(tiny_bert_dir, tmp_path / "mood", ["negative", "positive"], 1)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "fun", "adapter": "nope"}) + "\n")
    capsys.readouterr()  # what building the adapters printed
    out = tmp_path / "out.jsonl"
    cases = [
        (["--adapter", f"a={tmp_path / 'mood'}", "--adapter", f"a={tmp_path / 'mood'}"], "given twice"),
        (["--adapter", f"a={tmp_path / 'mood'}"], "row 1 names adapter 'nope', which is not loaded"),
        (["--adapter", f"a={tmp_path / 'missing'}"], "not an adapter folder"),
    ]
    for adapters, message in cases:
        expect_error(
            capsys, ["predict", *adapters, "--input", str(tmp_path / "in.jsonl"), "--output", str(out)], message
        )
        assert not out.exists()


def test_peft_multi_adapter_folder_loads_by_its_names(tmp_path):
    """A folder peft saved with a "default" adapter at its root and another in a subfolder."""
    from peftkit.multi import folder_adapters, read_specs

    base, head = build("bert")
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, target_modules=["query", "value"])
    )
    ref.add_adapter("other", peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["key"]))
    perturb([p for p in ref.parameters() if p.requires_grad], 9)
    ref.save_pretrained(str(tmp_path / "p"))
    specs = folder_adapters(tmp_path / "p")
    assert [n for n, _ in specs] == ["default", "other"]
    _, task, loaded = read_specs(specs, model="unused")
    named = NamedAdapters(copy.deepcopy(base))
    for name, item in loaded.items():
        named.add(name, item.files.method_config(), item.state)
    for name in ("default", "other"):
        ref.set_adapter(name)
        named.set_active(name)
        assert (forward(named.model).softmax(-1) - forward(ref).softmax(-1)).abs().max() <= 1e-5
    assert task == "classification"


def test_cli_generate_answers_each_row_with_its_adapter(tiny_llama_dir, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from peftkit.cli import main
    from peftkit.generation import generate
    from peftkit.methods import apply_method, save_adapter
    from peftkit.multi import load_adapted_lm

    for name, seed in (("left", 3), ("right", 4)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        apply_method(model, LoraConfig(r=4, alpha=16, target_modules="all-linear"))
        for k in range(4):  # strong enough to change the greedy tokens
            perturb([p for p in model.parameters() if p.requires_grad], seed * 10 + k)
        save_adapter(model, tmp_path / name, base_model=str(tiny_llama_dir), task="causal_lm")
    rows = [
        {"prompt": "hello how are you", "adapter": "right"},
        {"prompt": "is it good ?", "adapter": "left"},
        {"prompt": "review : fun", "adapter": "right", "id": 3},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "generate",
                "--adapter",
                f"left={tmp_path / 'left'}",
                "--adapter",
                f"right={tmp_path / 'right'}",
                "--input",
                str(tmp_path / "in.jsonl"),
                "--text-field",
                "prompt",
                "--max-new-tokens",
                "6",
                "--raw",
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["adapter"] for o in out] == ["right", "left", "right"] and out[2]["id"] == 3
    alone = {n: load_adapted_lm(tmp_path / n) for n in ("left", "right")}

    def answer(name: str, prompt: str) -> str:
        lm = alone[name]
        return generate(lm.model, lm.tokenizer, [lm.prompt_ids(prompt, raw=True)], max_new_tokens=6)[0]

    for row, o in zip(rows, out):
        assert o["answer"] == answer(row["adapter"], row["prompt"])
    assert answer("left", rows[0]["prompt"]) != out[0]["answer"]  # the adapters really differ


@pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"), reason="needs bitsandbytes")
def test_named_adapters_on_a_quantized_base_match_each_adapter_alone(tiny_bert_dir, tmp_path):
    from peftkit.multi import load_adapted_classifier, load_named, parse_specs, predict_rows

    saved_classifier(tiny_bert_dir, tmp_path / "a", ["negative", "positive"], 1)
    saved_classifier(tiny_bert_dir, tmp_path / "b", ["x", "y", "z"], 2, ("query", "key", "dense"))
    texts = ["the movie was great", "a dull and boring plot", "quite fun"]
    named = load_named(parse_specs([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]), quantize=8)
    got = predict_rows(named, texts, ["b", "a", "b"])
    for text, name, probs in zip(texts, ["b", "a", "b"], got):
        alone, _ = load_adapted_classifier(tmp_path / name, quantize=8).predict_proba([text])
        assert probs.shape == alone[0].shape and abs(probs - alone[0]).max() <= 1e-4


def test_pack_writes_peft_multi_adapter_layout(tmp_path):
    """peftkit pack: a folder peft's from_pretrained + load_adapter read, and peftkit reads back."""
    from peftkit.cli import main
    from peftkit.multi import folder_adapters

    base, ref = peft_pair("bert", tmp_path)
    assert (
        main(
            [
                "pack",
                "--adapter",
                f"default={tmp_path / 'p' / 'first'}",
                "--adapter",
                f"other={tmp_path / 'p' / 'second'}",
                "--output",
                str(tmp_path / "packed"),
            ]
        )
        == 0
    )
    assert [n for n, _ in folder_adapters(tmp_path / "packed")] == ["default", "other"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "packed"))
    again.load_adapter(str(tmp_path / "packed" / "other"), adapter_name="other")
    for theirs, ours in (("first", "default"), ("second", "other")):
        ref.set_adapter(theirs)
        again.set_adapter(ours)
        assert (forward(again) - forward(ref)).abs().max() <= 1e-5
    assert main(["pack", "--adapter", f"a={tmp_path / 'p' / 'first'}", "--output", str(tmp_path / "packed")]) == 2


def test_gpt2_conv1d_layers_take_named_lora_and_ia3_adapters(tmp_path):
    """GPT-2's Conv1D layers (weights stored in x out): named LoRA and IA3 adapters match peft's, mixed too."""
    import transformers as tf

    torch.manual_seed(0)
    base = tf.GPT2ForSequenceClassification(
        tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0)
    )
    task = peft.TaskType.SEQ_CLS
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(task_type=task, r=4, target_modules=["c_attn"], fan_in_fan_out=True),
        adapter_name="first",
    )
    ref.add_adapter(
        "second", peft.LoraConfig(task_type=task, r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    for name, seed in (("first", 1), ("second", 2)):
        perturb([p for n, p in ref.named_parameters() if f".{name}." in n], seed)
    ref.save_pretrained(str(tmp_path / "p"))
    named = load_named(base, {"a": tmp_path / "p" / "first", "b": tmp_path / "p" / "second"})
    expected = forward(ref, adapter_names=["second", "first", "__base__", "first"])
    with named.per_row(["b", "a", None, "a"]):
        got = forward(named.model)
    assert (got.softmax(-1) - expected.softmax(-1)).abs().max() <= 1e-5
    assert (got - forward(base)).abs().max() > 1e-2

    # an IA3 adapter on the same Conv1D layers, by peft, beside the LoRA ones
    ia3 = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(
            task_type=task,
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
        ),
    )
    perturb([p for p in ia3.parameters() if p.requires_grad], 3)
    ia3.save_pretrained(str(tmp_path / "ia3"))
    files = read_adapter(tmp_path / "ia3")
    named.add("c", files.method_config(), read_adapter_weights(tmp_path / "ia3", files.method_config()))
    ia3_logits = forward(ia3)
    with named.per_row(["c", "a", "c", None]):
        got = forward(named.model)
    assert (got[[0, 2]].softmax(-1) - ia3_logits[[0, 2]].softmax(-1)).abs().max() <= 1e-5
    assert (got[1].softmax(-1) - expected[1].softmax(-1)).abs().max() <= 1e-5
    assert (ia3_logits - forward(base)).abs().max() > 1e-2
