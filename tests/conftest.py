"""Shared fixtures: tiny models built from configs, and a small synthetic sentiment corpus.

Nothing here downloads: models are random-initialised from configs and saved to a temp
folder with a tokenizer built from a word list.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

POSITIVE = ["good", "great", "excellent", "wonderful", "fun", "moving", "brilliant", "superb"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "weak", "poor", "tedious"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "quite", "and", "a", "story", "very"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER
ROOT = Path(__file__).resolve().parents[1]


def _method_examples() -> dict:
    """One small config per registered method (the registry says which there are; a test checks
    that every one has an example)."""
    from peftkit.methods import (
        AdaLoraConfig,
        BitFitConfig,
        BottleneckConfig,
        FullConfig,
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PTuningConfig,
        VeraConfig,
    )
    from peftkit.methods.tuner_configs import LNTuningConfig

    return {
        "lora": LoraConfig(r=4, alpha=8),
        "vera": VeraConfig(r=4),
        "loha": LoHaConfig(r=2, alpha=4),
        "lokr": LoKrConfig(r=2, alpha=4),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, alpha=8),
        "adapter": BottleneckConfig(placement="houlsby", reduction_factor=4),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
        "ptuning": PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
        "ia3": IA3Config(),
        "bitfit": BitFitConfig(),
        "full": FullConfig(),
        "ln_tuning": LNTuningConfig(),
    }


#: a recipe-sized example config of every method, by its name
METHOD_EXAMPLES = _method_examples()
SHARED_DATA = ROOT.parent / "shared" / "data"


def make_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def tiny_bert_config(**kw):
    from transformers import BertConfig

    args = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
    )
    args.update(kw)
    return BertConfig(**args)


def review(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(3, 8)) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def sentiment_rows(n: int, seed: int = 0, names: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append({"text": review(rng, label), "label": ["negative", "positive"][label] if names else label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plant_polarity(embeddings: torch.nn.Embedding, strength: float = 1.0, seed: int = 0) -> None:
    """Give positive and negative words opposite offsets along one random direction.

    A random base that has never seen data passes almost no word identity to the [CLS]
    position; this stands in for what pretraining gives a real encoder, so that a few
    epochs of LoRA can learn the task.
    """
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(embeddings.weight.shape[1], generator=g)
    direction *= strength / direction.norm()
    with torch.no_grad():
        for w in POSITIVE:
            embeddings.weight[VOCAB.index(w)] += direction
        for w in NEGATIVE:
            embeddings.weight[VOCAB.index(w)] -= direction


@pytest.fixture(scope="session", autouse=True)
def isolated_token_cache(tmp_path_factory) -> Path:
    """Token-cache entries go to a temporary folder, never the user's (CLI subprocesses inherit it)."""
    import os

    path = tmp_path_factory.mktemp("peftkit-cache")
    previous = os.environ.get("PEFTKIT_CACHE")
    os.environ["PEFTKIT_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PEFTKIT_CACHE", None)
    else:
        os.environ["PEFTKIT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT base model (no head) with its tokenizer, saved locally."""
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    model = BertModel(tiny_bert_config())
    plant_polarity(model.embeddings.word_embeddings)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tuned_bert_dir(tmp_path_factory, tiny_bert_dir, sentiment_dir) -> Path:
    """The tiny BERT encoder after LoRA training on the synthetic task, merged, head dropped.

    Stands in for a pretrained encoder whose [CLS] output already carries the signal,
    which methods that leave every weight frozen (prefix, prompt) need in order to learn.
    """
    from peftkit import load_recipe
    from peftkit.methods import merge_and_unload
    from peftkit.multi import load_adapted_classifier
    from peftkit.train import train

    path = tmp_path_factory.mktemp("tuned-bert")
    recipe = tiny_recipe(path, tiny_bert_dir, sentiment_dir)
    train(load_recipe(recipe), echo=lambda _: None)
    clf = load_adapted_classifier(path / "run" / "adapter")
    merge_and_unload(clf.model)
    clf.model.bert.save_pretrained(path / "model")
    clf.tokenizer.save_pretrained(path / "model")
    return path / "model"


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    """train/validation/test JSONL files of the synthetic corpus, string labels."""
    path = tmp_path_factory.mktemp("sentiment")
    write_jsonl(path / "train.jsonl", sentiment_rows(320, seed=1))
    write_jsonl(path / "validation.jsonl", sentiment_rows(80, seed=2))
    write_jsonl(path / "test.jsonl", sentiment_rows(80, seed=3))
    return path


def tiny_recipe(tmp_path: Path, model_dir: Path, data_dir: Path, **extra) -> Path:
    """A recipe that trains the tiny model well in a few seconds."""
    import yaml

    recipe = {
        "model": str(model_dir),
        "dataset": str(data_dir),
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "data": {"max_length": 32},
        "train": {"epochs": 4, "batch_size": 16, "lr": 0.02, "log_steps": 5, "warmup_ratio": 0.0},
    }
    for key, value in extra.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run ``python -m peftkit ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- tiny decoders, with a word-level tokenizer that has a chat template ----
LM_WORDS = (
    [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "review",
        ":",
        "positive",
        "negative",
        "or",
        "?",
        "is",
        "it",
        "yes",
        "no",
        "hello",
        "hi",
        "how",
        "are",
        "you",
    ]
    + POSITIVE
    + NEGATIVE
    + FILLER
)
LM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
LM_PROMPT = "review : {text} positive or negative ?"


def make_lm_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template:
        tok.chat_template = LM_CHAT_TEMPLATE
    return tok


def build_lm(family: str):
    """A tiny causal LM over ``LM_WORDS``. Its (tied) embeddings get the scale pretraining gives
    them: at the default init's 0.02 the frozen output layer cannot tell words apart by more
    than a logit or so, and a method that keeps it frozen could not learn any task."""
    torch.manual_seed(0)
    model = _new_lm(family)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight.normal_(0.0, 1.0)
    g = torch.Generator().manual_seed(1)  # and, as for the tiny BERT, sentiment words carry a direction
    direction = torch.randn(emb.weight.shape[1], generator=g)
    with torch.no_grad():
        for words, sign in ((POSITIVE + ["positive"], 1), (NEGATIVE + ["negative"], -1)):
            for w in words:
                emb.weight[LM_WORDS.index(w)] += sign * 2 * direction / direction.norm() * emb.weight.shape[1] ** 0.5
    return model


def _new_lm(family: str):
    import transformers as tf

    v = len(LM_WORDS)
    if family == "llama":
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=v,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
                tie_word_embeddings=True,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(
            tf.Qwen2Config(
                vocab_size=v,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
                tie_word_embeddings=True,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )
    if family == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=v,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=128,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )
    raise ValueError(family)


# ---- preference pairs over the tiny decoders' words ----
def preference_rows(n: int, chat: bool, seed: int = 0) -> list[dict]:
    """Reviews to judge; the chosen answer names the sentiment, the rejected one the other (some
    answers several words long, so lengths differ within a pair)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        text = " ".join(rng.sample(FILLER, rng.randint(2, 5)) + [rng.choice(POSITIVE if label else NEGATIVE)])
        good, bad = ("positive", "negative") if label else ("negative", "positive")
        if rng.random() < 0.5:
            good = f"{good} {rng.choice(FILLER)} {good}"
        prompt = f"review : {text} positive or negative ?"
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            rows.append({"prompt": prompt + " ", "chosen": good, "rejected": bad})
    return rows


def unpaired_rows(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for i, pair in enumerate(preference_rows(n, chat=False, seed=seed)):
        good = i % 3 != 0  # an unbalanced mix, as KTO data usually is
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaMA causal LM with the word-level chat tokenizer, saved locally."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_lm("llama").save_pretrained(path)
    make_lm_tokenizer().save_pretrained(path)
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """With ``PEFTKIT_NO_SKIPS=1`` (CI sets it) any skipped test fails the run: a dev dependency that
    did not install, or a browser apt could not bring, must not silently switch tests off."""
    import os

    if not os.environ.get("PEFTKIT_NO_SKIPS"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reasons = sorted({str(r.longrepr[-1]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
        print(f"\n{len(skipped)} tests skipped, and PEFTKIT_NO_SKIPS forbids it: " + "; ".join(reasons[:5]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
