"""Causal LM task: record formats, loss masks, truncation, packing, training, generation."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.causal import IGNORE, LMEncoder, Rows, collate_lm, pack
from peftkit.config import DataConfig
from peftkit.errors import PeftkitError
from peftkit.evaluate import exact_match
from peftkit.generation import generate
from peftkit.lm_loss import causal_lm_loss

from .conftest import LM_PROMPT, build_lm, make_lm_tokenizer, run_cli, tiny_recipe, write_jsonl
from .test_errors import expect_error


def encode(rows, kind, chat=True, **data):
    tok = make_lm_tokenizer(chat_template=chat)
    names = ["negative", "positive"] if kind == "labelled" else None
    enc = LMEncoder(tok, DataConfig(**data), names)
    classes = [r.get("label_id", 0) for r in rows] if names else None
    return tok, enc.encode_split(Rows(rows, kind), "test data", classes)


def targets(tok, feature):
    return tok.decode([t for t in feature["labels"] if t != IGNORE])


@pytest.mark.parametrize("chat", [True, False])
def test_only_completion_tokens_carry_loss(chat):
    tok, enc = encode([{"prompt": "hello how are you", "completion": "fun and good"}], "prompt_completion", chat)
    f = enc.features[0]
    assert len(f["labels"]) == len(f["input_ids"])
    if chat:
        assert targets(tok, f) == "fun and good <|end|>"
        assert tok.decode(f["input_ids"]).startswith("<|user|> hello how are you <|end|> <|assistant|>")
    else:
        assert targets(tok, f) == "fun and good </s>"
    _, everything = encode(
        [{"prompt": "hello how are you", "completion": "fun"}], "prompt_completion", chat, train_on_prompt=True
    )
    assert IGNORE not in everything.features[0]["labels"]


def test_chat_records_train_on_assistant_turns_only():
    messages = [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "is it fun ?"},
        {"role": "assistant", "content": "yes very fun"},
    ]
    tok, enc = encode([{"messages": messages}], "chat")
    f = enc.features[0]
    assert tok.decode(f["input_ids"]) == tok.apply_chat_template(messages, tokenize=False).strip()
    assert targets(tok, f) == "good <|end|> yes very fun <|end|>"


def test_labelled_prompts_score_the_label_words():
    tok, enc = encode(
        [{"text": "the film was great", "label": "positive", "label_id": 1}], "labelled", prompt_template=LM_PROMPT
    )
    assert targets(tok, enc.features[0]) == "positive <|end|>"
    assert tok.decode(enc.prompts[0]).endswith("positive or negative ? <|end|> <|assistant|>")
    assert enc.classes == [1]


def test_truncation_shortens_the_prompt_and_counts_lost_completions():
    long_prompt = " ".join(["movie"] * 40)
    rows = [
        {"prompt": long_prompt, "completion": "good"},
        {"prompt": "hi", "completion": " ".join(["fun"] * 40)},
        {"prompt": "hi", "completion": "good"},
    ]
    tok, enc = encode(rows, "prompt_completion", max_length=16)
    assert all(len(f["input_ids"]) <= 16 for f in enc.features)
    assert targets(tok, enc.features[0]) == "good <|end|>"  # the completion survived whole
    assert enc.truncated == 2 and enc.completion_cut == 1
    # a labelled prompt loses the end of its text, never the question or the answer
    tok, lab = encode(
        [{"text": " ".join(["film"] * 40), "label": "negative", "label_id": 0}],
        "labelled",
        prompt_template=LM_PROMPT,
        max_length=20,
    )
    text = tok.decode(lab.features[0]["input_ids"])
    assert len(lab.features[0]["input_ids"]) <= 20 and "positive or negative ? <|end|>" in text
    assert targets(tok, lab.features[0]) == "negative <|end|>" and lab.completion_cut == 0


@pytest.mark.parametrize(
    "rows,kind,data,message",
    [
        ([{"prompt": "hi", "completion": None}], "prompt_completion", {}, "a record has no completion"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], "chat", {}, "a chat message has role 'robot'"),
        (
            [{"text": "good film", "label": "positive", "label_id": 1}],
            "labelled",
            {"prompt_template": LM_PROMPT, "max_length": 8},
            "shorter than the prompt template",
        ),
    ],
)
def test_bad_records_are_one_line_errors(rows, kind, data, message):
    with pytest.raises(PeftkitError, match=message):
        encode(rows, kind, **data)


def test_chat_records_or_chat_template_need_a_template():
    with pytest.raises(PeftkitError, match="chat records need a chat template"):
        encode([{"messages": [{"role": "user", "content": "hi"}]}], "chat", chat=False)
    with pytest.raises(PeftkitError, match="the tokenizer has no chat template"):
        LMEncoder(make_lm_tokenizer(chat_template=False), DataConfig(chat_template=True))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packing_keeps_examples_apart(family):
    model = build_lm(family).eval()
    tok, enc = encode(
        [
            {"prompt": "hi", "completion": "good film"},
            {"prompt": "how are you", "completion": "fun"},
            {"prompt": "is it fun ?", "completion": "yes very"},
        ],
        "prompt_completion",
        chat=False,
    )
    packed = pack(enc.features, max_length=64, seed=0)
    assert len(packed) == 1 and len(set(packed[0]["segments"])) == 3
    starts = [i for i, p in enumerate(packed[0]["position_ids"]) if p == 0]
    assert all(packed[0]["labels"][i] == IGNORE for i in starts)
    with torch.no_grad():
        batch = collate_lm(packed, tok.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0]
        total = causal_lm_loss(model, num_items=1, **batch)
        alone_total = 0.0
        for start, f in zip(starts, [enc.features[i] for i in _packed_order(packed[0], enc.features)]):
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            assert torch.allclose(logits[start : start + len(f["input_ids"])], alone, atol=1e-5)
            alone_total += causal_lm_loss(
                model, torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]]), num_items=1
            ).item()
    assert abs(total.item() - alone_total) < 1e-4  # the same loss as the examples one by one


def _packed_order(row, features):
    """Which feature each packed segment came from (matched by its ids)."""
    order, pos = [], 0
    for seg in sorted(set(row["segments"])):
        n = row["segments"].count(seg)
        ids = row["input_ids"][pos : pos + n]
        order.append(next(i for i, f in enumerate(features) if f["input_ids"] == ids))
        pos += n
    return order


def test_exact_match_normalises_answers():
    got = exact_match(["Positive.", " negative", "maybe"], [1, 1, 0], ["negative", "positive"])
    assert got == {"exact_match": pytest.approx(1 / 3), "valid_label_rate": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama_dir, sentiment_dir):
    """LoRA on the tiny LLaMA, sentiment phrased as generation with the chat template."""
    from peftkit import load_recipe
    from peftkit.train import train

    path = tmp_path_factory.mktemp("lm-run")
    recipe = tiny_recipe(
        path,
        tiny_llama_dir,
        sentiment_dir,
        task="causal_lm",
        **{
            "method.target_modules": "all-linear",
            "data.prompt_template": LM_PROMPT,
            "data.max_length": 48,
            "train.epochs": 10,
            "train.lr": 0.01,
            "train.eval_batch_size": 32,
        },
    )
    summary = train(load_recipe(recipe), echo=lambda _: None)
    return path / "run", summary


def test_causal_lm_training_learns_labelled_prompts(lm_run):
    run, summary = lm_run
    val, test = summary["validation"], summary["test"]
    for key in ("loss", "perplexity", "accuracy", "f1"):
        assert key in val
    assert val["perplexity"] == pytest.approx(torch.tensor(val["loss"]).exp().item(), rel=1e-4)
    assert test["accuracy"] >= 0.9, test  # keyword sentiment: the tiny model learns it
    assert test["valid_label_rate"] >= 0.9 and test["exact_match"] >= 0.85, test
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    meta = json.loads((run / "adapter" / "peftkit.json").read_text())
    assert meta["prompt_template"] == LM_PROMPT and meta["chat_template"] is True


def test_merged_and_unmerged_adapters_generate_the_same_greedy_tokens(lm_run):
    from peftkit.methods import merge_and_unload
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(lm_run[0] / "adapter")
    prompts = [lm.prompt_ids(t) for t in ["the film was great", "a dull and tedious story", "hello"]]
    unmerged = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=6)  # no stop: six tokens each
    merge_and_unload(lm.model)
    assert generate(lm.model, lm.tokenizer, prompts, max_new_tokens=6) == unmerged
    assert unmerged[0].split()[0] == "positive" and unmerged[1].split()[0] == "negative"


def test_generate_command_streams_one_answer_and_writes_many(lm_run, tmp_path):
    adapter = str(lm_run[0] / "adapter")
    done = run_cli("generate", "--adapter", adapter, "--prompt", "the acting was superb", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "positive"  # and it stopped at the end of its turn
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "boring film"}, {"text": "a wonderful story"}])
    done = run_cli(
        "generate",
        "--adapter",
        adapter,
        "--input",
        str(inputs),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--max-new-tokens",
        "2",
        "--merge",
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line)["answer"].strip() for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert answers == ["negative", "positive"]


def test_causal_lm_data_errors_exit_2(capsys, tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "hi", "answer": "good"}] * 4)
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, data, task="causal_lm")
    expect_error(capsys, ["train", str(recipe)], "column 'completion' not found")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}] * 4)
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, chat, task="causal_lm")
    expect_error(capsys, ["train", str(recipe)], "a chat message has role 'bot'")
    assert not (tmp_path / "run").exists()  # nothing written


def test_lm_adapter_loads_in_peft_with_the_same_logits(lm_run, tiny_llama_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from peftkit.multi import load_adapted_lm

    ids = torch.tensor([[5, 8, 9, 39, 41, 12, 11, 13, 7, 6]])
    ours = load_adapted_lm(lm_run[0] / "adapter")
    ref = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(lm_run[0] / "adapter")
    ).eval()
    assert ref.peft_config["default"].task_type == "CAUSAL_LM"
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - ours.model(input_ids=ids).logits).abs().max() <= 1e-5


def test_a_peft_lora_on_gpt2_conv1d_loads_for_generation(tmp_path):
    """peft -> peftkit for a causal LM whose linear layers are Conv1D (fan-in/fan-out)."""
    peft = pytest.importorskip("peft")
    from peftkit.multi import load_adapted_lm

    base = build_lm("gpt2")
    base.save_pretrained(tmp_path / "base")
    make_lm_tokenizer().save_pretrained(tmp_path / "base")
    ref = peft.get_peft_model(
        build_lm("gpt2"),
        peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(str(tmp_path / "p"))
    ours = load_adapted_lm(tmp_path / "p", model=str(tmp_path / "base"))
    ids = torch.tensor([[5, 8, 9, 39, 41, 12, 11]])
    ref.eval()
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - ours.model(input_ids=ids).logits).abs().max() <= 1e-5
    assert generate(ours.model, ours.tokenizer, [ids[0].tolist()], max_new_tokens=4) == generate(
        ref, ours.tokenizer, [ids[0].tolist()], max_new_tokens=4
    )


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ia3", "bitfit", "full"])
def test_every_method_trains_a_decoder_and_generates(method, tmp_path, tiny_llama_dir, sentiment_dir):
    from peftkit import load_recipe
    from peftkit.multi import load_adapted_lm
    from peftkit.train import train

    extra = {"method.target_modules": "all-linear"} if method == "lora" else {}
    if method == "prompt":
        extra["method.init"] = "vocab"
    model_dir = tiny_llama_dir
    if method == "bitfit":  # LLaMA has no bias terms; Qwen2's attention projections do
        model_dir = tmp_path / "qwen2"
        build_lm("qwen2").save_pretrained(model_dir)
        make_lm_tokenizer().save_pretrained(model_dir)
    recipe = tiny_recipe(
        tmp_path,
        model_dir,
        sentiment_dir,
        task="causal_lm",
        **{
            "method": {"name": method},
            **extra,
            "data.prompt_template": LM_PROMPT,
            "data.max_length": 48,
            "data.max_train_samples": 64,
            "data.max_eval_samples": 16,
            "train.epochs": 1,
            "train.lr": 0.005,
        },
    )
    summary = train(load_recipe(recipe), echo=lambda _: None)
    assert summary["steps"] == 4 and summary["test"]["n"] == 16
    # the saved adapter, loaded afresh, reproduces the run's own test metrics on the same 16 rows
    # (generation's exact match and valid-label rate included)
    from peftkit.predict import evaluate_lm_adapter

    lm = load_adapted_lm(tmp_path / "run" / "adapter")
    again = evaluate_lm_adapter(lm, str(sentiment_dir), "test", max_samples=16)
    for key in ("loss", "accuracy", "exact_match", "valid_label_rate"):
        assert again[key] == pytest.approx(summary["test"][key], abs=1e-5), key


def test_a_decoder_trains_as_a_sequence_classifier(tmp_path, sentiment_dir):
    """LlamaForSequenceClassification with a tokenizer that has no pad token (one is set)."""
    from peftkit import load_recipe
    from peftkit.train import train

    tok = make_lm_tokenizer()
    tok.pad_token = None
    build_lm("llama").model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recipe = tiny_recipe(
        tmp_path,
        tmp_path / "m",
        sentiment_dir,
        **{"method.target_modules": ["q_proj", "v_proj"], "train.epochs": 3, "train.lr": 0.01},
    )
    summary = train(load_recipe(recipe), echo=lambda _: None)
    assert summary["test"]["accuracy"] >= 0.9, summary["test"]


def test_eval_command_on_an_lm_adapter_reproduces_the_runs_test_metrics(capsys, lm_run, sentiment_dir, tmp_path):
    from peftkit.cli import main

    run, summary = lm_run
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(run / "adapter"), "--data", str(sentiment_dir), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("accuracy", "exact_match", "valid_label_rate", "loss", "perplexity"):
        assert result[key] == pytest.approx(summary["test"][key], abs=1e-5), key
    assert "accuracy" in capsys.readouterr().out
