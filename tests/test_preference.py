"""Preference and reward runs as a user sees them: every method trains (or is refused on one line),
bad rows are refused with their row number, truncation is counted, the metrics are logged under
TRL's names, a killed run resumes bit for bit, and eval --preference scores peft's adapters too."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from peftkit import load_recipe
from peftkit.train import train

from .conftest import (
    FILLER,
    METHOD_EXAMPLES,
    NEGATIVE,
    POSITIVE,
    build_lm,
    make_lm_tokenizer,
    preference_rows,
    run_cli,
    unpaired_rows,
    write_jsonl,
)
from .test_resume import assert_same_run, newest_step, start, stopped_at


def pair_data(tmp: Path, chat: bool = True, n: int = 48, rows: list[dict] | None = None) -> Path:
    data = tmp / ("chat-pairs" if chat else "plain-pairs")
    data.mkdir(parents=True, exist_ok=True)
    rows = rows or preference_rows(n, chat)
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", preference_rows(16, chat, seed=1))
    write_jsonl(data / "test.jsonl", preference_rows(16, chat, seed=2))
    return data


def recipe(tmp: Path, model: Path, data: Path, name: str = "run", **extra) -> Path:
    body = {
        "task": "preference",
        "model": str(model),
        "dataset": str(data),
        "output_dir": str(tmp / name),
        "seed": 0,
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"max_length": 40},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "log_steps": 3, "warmup_ratio": 0.0},
    }
    for key, value in extra.items():
        node = body
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_dpo_learns_and_logs_trl_metrics(tiny_llama_dir, tmp_path):
    path = recipe(tmp_path, tiny_llama_dir, pair_data(tmp_path), **{"train.epochs": 4})
    summary = train(load_recipe(path))
    assert summary["validation"]["rewards/accuracies"] > 0.8  # the chosen answers are the right labels
    assert summary["test"]["rewards/margins"] > 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "train"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(key in r for r in logged), key
    assert {"logps/chosen", "logps/rejected"} <= set(records[-1])  # the test record
    # the adapter is an ordinary causal-LM adapter: generate answers with it
    done = run_cli("generate", "--adapter", str(tmp_path / "run" / "adapter"), "--prompt", "review : great ?")
    assert done.returncode == 0, done.stderr


METHODS = sorted(METHOD_EXAMPLES)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2: its attention projections have biases, for BitFit (LLaMA's have none)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    build_lm("qwen2").save_pretrained(path)
    make_lm_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_dpo(name, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    """The reference is the base with the adapter disabled, whatever the method changes (layers,
    virtual tokens, biases, whole weights)."""
    model = tiny_qwen2_dir if name == "bitfit" else tiny_llama_dir
    path = recipe(tmp_path, model, pair_data(tmp_path, n=16), **{"train.max_steps": 2, "data.max_length": 48})
    cfg = load_recipe(path)
    cfg.method = METHOD_EXAMPLES[name]
    summary = train(cfg)
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= summary["test"]["rewards/accuracies"] <= 1.0


@pytest.mark.parametrize("bits", [8, 4])
def test_dpo_on_a_quantized_base(bits, tiny_llama_dir, tmp_path):
    path = recipe(tmp_path, tiny_llama_dir, pair_data(tmp_path, n=16), **{"train.max_steps": 2})
    summary = train(load_recipe(path, [f"quantization.bits={bits}"]))
    assert summary["quantization"]["bits"] == bits and summary["steps"] == 2


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_paired_loss_trains(loss, tiny_llama_dir, tmp_path):
    rows = preference_rows(48, chat=False)
    extra: list[str] = []
    if loss == "robust":  # it assumes a share of flipped pairs
        extra = ["preference.label_smoothing=0.1"]
    if loss in ("simpo", "orpo"):  # no reference: the answers' own mean log-probabilities must move
        rows = [{**r, "chosen": r["chosen"].split()[0]} for r in rows]  # one-word answers
        extra = ["train.lr=0.003", "train.epochs=4", "method={name: lora}"]
    if loss == "simpo":
        extra.append("preference.beta=2.0")  # the SimPO paper's
    if loss == "orpo":  # the toy model's NLL is large: the odds-ratio term needs a larger weight
        extra += ["preference.beta=1.0", "train.lr=0.01"]
    data = pair_data(tmp_path, chat=False, rows=rows)
    summary = train(load_recipe(recipe(tmp_path, tiny_llama_dir, data, **{"preference.loss": loss}), extra))
    assert summary["validation"]["rewards/accuracies"] >= 0.75, summary["validation"]


def test_kto_trains_on_single_answers(tiny_llama_dir, tmp_path):
    data = tmp_path / "kto"
    data.mkdir()
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1)):
        write_jsonl(data / f"{split}.jsonl", unpaired_rows(n, seed))
    path = recipe(tmp_path, tiny_llama_dir, data, **{"preference.loss": "kto", "train.epochs": 3})
    summary = train(load_recipe(path))
    assert summary["validation"]["rewards/margins"] > 0 and "kl" in summary["validation"]
    assert summary["best_step"] is not None  # followed rewards/margins: KTO ranks no pairs


BAD_ROWS = [
    ({"prompt": "review : good ?", "chosen": "positive"}, "the row has no rejected"),
    ({"prompt": "review : good ?", "chosen": "positive", "rejected": " "}, "the rejected answer is empty"),
    ({"prompt": "a ?", "chosen": "positive", "rejected": "positive"}, "chosen and rejected are the same"),
    (
        {
            "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        "the prompt ends on a assistant message",
    ),
    (
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "user", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        "the chosen holds a user message",
    ),
    (
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"},
        "the row mixes message lists and plain text",
    ),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_a_bad_row_is_one_line_with_its_number(bad, message, tiny_llama_dir, tmp_path):
    rows = preference_rows(4, chat=isinstance(bad["prompt"], list))
    rows[2] = bad
    data = pair_data(tmp_path, chat=isinstance(bad["prompt"], list), rows=rows)
    done = run_cli("train", str(recipe(tmp_path, tiny_llama_dir, data)))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "train split, row 3)" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_truncation_is_counted_and_long_prompts_dropped(tiny_llama_dir, tmp_path):
    rows = preference_rows(16, chat=False)
    long = " ".join(["great"] * 60)
    rows[0]["prompt"] = f"review : {long} ?"  # fills max_length alone: dropped
    rows[1]["chosen"] = "positive " + " ".join(["good"] * 40)  # cut at max_length
    path = recipe(tmp_path, tiny_llama_dir, pair_data(tmp_path, chat=False, rows=rows), **{"train.max_steps": 1})
    summary = train(load_recipe(path))
    assert summary["truncation"]["train"] == {"over_max_length": 1, "prompt_fills_max_length": 1}
    assert summary["train_examples"] == 15


def _resume_recipe(tmp: Path, model: Path, data: Path, name: str, precompute: bool) -> Path:
    return recipe(
        tmp,
        model,
        data,
        name,
        **{
            "train.save_steps": 1,
            "train.eval_steps": 4,
            "train.save_total_limit": 2,
            "preference.precompute_reference": precompute,
            "method.dropout": 0.1,
            "preference.disable_dropout": False,  # dropout's random masks are part of the exact state
        },
    )


@pytest.mark.parametrize("precompute", [False, True])
def test_a_killed_dpo_run_resumes_bit_for_bit(precompute, tiny_llama_dir, tmp_path):
    data = pair_data(tmp_path)
    reference = _resume_recipe(tmp_path, tiny_llama_dir, data, "ref", precompute)
    proc = start(reference)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    killed_recipe = _resume_recipe(tmp_path, tiny_llama_dir, data, "kill", precompute)
    killed = stopped_at(killed_recipe, "step:7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert newest_step(tmp_path / "kill") == 6
    resumed = start(killed_recipe, "resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "(step 6)" in out
    if precompute:  # the resumed run reads the reference log-probabilities back
        assert "reference log-probabilities of train: from the cache" in out
    assert_same_run(tmp_path / "kill", tmp_path / "ref")


def test_sft_then_dpo_from_an_adapter_with_it_as_reference(tiny_llama_dir, tmp_path):
    """train.init_adapter starts from the SFT adapter, which is also the reference: at the first
    step the policy equals its reference, so every reward is 0 and the loss is log 2."""
    data = pair_data(tmp_path)
    first = train(load_recipe(recipe(tmp_path, tiny_llama_dir, data, "sft", **{"train.max_steps": 3})))
    adapter = first["adapter"]
    done = run_cli(
        "eval",
        "--adapter",
        adapter,
        "--data",
        str(data),
        "--preference",
        "dpo",
        "--reference",
        adapter,
        "--output",
        "-",
    )
    assert done.returncode == 0, done.stderr
    same = json.loads(done.stdout)
    assert same["loss"] == pytest.approx(0.6931472, abs=1e-6) and same["rewards/margins"] == 0.0
    second = recipe(tmp_path, tiny_llama_dir, data, "dpo", **{"train.init_adapter": adapter, "train.max_steps": 3})
    summary = train(load_recipe(second))
    assert summary["steps"] == 3 and summary["preference"]["loss"] == "dpo"


def test_eval_preference_scores_a_peft_adapter(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path / "peft-adapter")
    data = pair_data(tmp_path)
    out = tmp_path / "eval.json"
    done = run_cli(
        "eval", "--adapter", str(tmp_path / "peft-adapter"), "--model", str(tiny_llama_dir),
        "--data", str(data), "--preference", "ipo", "--beta", "0.5", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["n"] == 16 and result["loss"] > 0 and result["beta"] == 0.5
    assert result["rewards/margins"] != 0  # the adapter changes the answers' log-probabilities
    assert "rewards/accuracies" in done.stdout


def test_eval_preference_refuses_a_classifier_and_bad_options(tiny_llama_dir, tmp_path):
    data = pair_data(tmp_path)
    done = run_cli("eval", "--adapter", "nowhere", "--data", str(data), "--beta", "0.2")
    assert done.returncode == 2 and "--beta and --reference go with --preference" in done.stderr
    done = run_cli("eval", "--adapter", "nowhere", "--data", str(data), "--preference", "dpo", "--beta", "-1")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_reward_model_on_an_encoder_scores_texts(tiny_bert_dir, tmp_path):
    """A reward model that learns which of two answers is kinder (a positive word over a
    negative one), scoring texts in predict and pairs in eval."""
    import random

    def kind_pairs(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [
            {
                "prompt": " ".join(rng.sample(FILLER, 3)) + " ",
                "chosen": f"{rng.choice(FILLER)} {rng.choice(POSITIVE)}",
                "rejected": f"{rng.choice(FILLER)} {rng.choice(NEGATIVE)}",
            }
            for _ in range(n)
        ]

    data = tmp_path / "kind"
    data.mkdir()
    for split, n, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 16, 2)):
        write_jsonl(data / f"{split}.jsonl", kind_pairs(n, seed))
    path = recipe(
        tmp_path,
        tiny_bert_dir,
        data,
        **{"task": "reward", "method.target_modules": ["query", "value"], "train.epochs": 4, "train.lr": 0.02},
    )
    summary = train(load_recipe(path))
    assert summary["validation"]["accuracy"] >= 0.9 and summary["label_names"] == ["score"]
    adapter = tmp_path / "run" / "adapter"
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was great\nthe movie was awful\n")
    done = run_cli("predict", "--adapter", str(adapter), "--input", str(texts), "--output", "-")
    assert done.returncode == 0, done.stderr
    scores = [json.loads(x)["score"] for x in done.stdout.splitlines() if x.startswith("{")]
    assert len(scores) == 2 and scores[0] > scores[1]
    done = run_cli("eval", "--adapter", str(adapter), "--data", str(data), "--split", "test", "--output", "-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1])["accuracy"] >= 0.9


def test_one_server_on_one_base_chats_with_the_dpo_adapter_and_scores_with_the_reward_one(tiny_llama_dir, tmp_path):
    """The policy answers chat requests and the reward adapter scores texts, both on one copy of the
    base; each answer equals what the adapter gives loaded alone."""
    httpx = pytest.importorskip("httpx")
    from peftkit.multi import load_adapted_lm, load_named, predict_rows

    from .test_serve import auth, start_server

    data = pair_data(tmp_path)
    dpo = train(load_recipe(recipe(tmp_path, tiny_llama_dir, data, "dpo", **{"train.max_steps": 4})))["adapter"]
    reward_recipe = recipe(
        tmp_path, tiny_llama_dir, data, "reward", **{"task": "reward", "train.max_steps": 4, "train.lr": 0.02}
    )
    reward = train(load_recipe(reward_recipe))["adapter"]
    texts = ["review : great ? positive", "review : awful ? positive", "hello"]
    alone = load_named([("r", Path(reward))])  # a sequence classifier of its own
    expected = [float(row[0]) for row in predict_rows(alone, texts, ["r"] * len(texts))]
    lm = load_adapted_lm(dpo)
    from peftkit.generation import generate

    question = "review : great film positive or negative ?"
    want = generate(lm.model, lm.tokenizer, [lm.prompt_ids(question)], max_new_tokens=4, stop_ids=lm.encoder.stop_ids)

    proc, url = start_server({"policy": Path(dpo), "reward": Path(reward)})
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models", headers=auth()).json()["data"]}
        assert models["reward"]["task"] == "reward" and models["policy"]["task"] == "causal_lm"
        scored = httpx.post(url + "/v1/classify", json={"adapter": "reward", "texts": texts}, headers=auth()).json()
        got = [r["score"] for r in scored["results"]]
        assert got == pytest.approx(expected, abs=1e-4)
        chat = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "policy", "messages": [{"role": "user", "content": question}], "max_tokens": 4,
                  "temperature": 0},
            headers=auth(),
            timeout=60,
        )  # fmt: skip
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == want[0]
        wrong = httpx.post(url + "/v1/classify", json={"adapter": "policy", "texts": ["x"]}, headers=auth())
        assert wrong.status_code == 400 and "generates text" in wrong.json()["error"]["message"]
        wrong = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "reward", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(),
        )
        assert wrong.status_code == 400 and "reward model" in wrong.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
