"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package.

Two kinds of file:

- **a model**: the architecture's hyper-parameters, the tokenizer (vocabulary, merges, special
  tokens, the chat template) and every weight under llama.cpp's tensor names;
- **a LoRA adapter** (``general.type = adapter``): ``lora_a`` ``(r, in)`` and ``lora_b`` ``(out, r)``
  for each adapted weight, named after that weight, and one ``adapter.lora.alpha``; llama.cpp
  scales each pair by ``alpha / r`` (``r`` read from the tensor).

Two things a plain rename gets wrong, and this module does not:

- llama.cpp's ``llama`` architecture rotates each head's query and key dimensions in adjacent
  pairs, transformers' LLaMA in two halves; the rows of ``q_proj``/``k_proj`` (and of their LoRA
  ``B``, which produces those rows) are reordered from halves to pairs (:func:`halves_to_pairs`);
- peft's scale ``s`` is not always ``alpha / r`` (rsLoRA's ``alpha / sqrt(r)``, rank and alpha
  patterns): the adapter file carries one alpha, and each ``B`` is multiplied by what that alpha
  leaves out, so that llama.cpp's ``alpha / r`` times ``B`` is peft's ``s B``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PeftkitError

#: transformers ``model_type`` -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: ``--dtype`` choices: how 2-D weights are stored (1-D tensors, norms and biases, stay float32)
DTYPES = ("f32", "f16", "bf16", "q8_0")
#: llama.cpp's pre-tokenizer names, for the byte-level BPE pre-tokenizers transformers writes
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE values


def architecture(config: Any) -> str:
    """The llama.cpp architecture of a transformers config.

    Raises:
        PeftkitError: a model llama.cpp cannot run as written here, or a RoPE scaling it would
            compute differently.
    """
    arch = ARCHITECTURES.get(getattr(config, "model_type", ""))
    if arch is None:
        raise PeftkitError(
            f"GGUF export does not support the {config.model_type!r} architecture",
            "--format gguf",
            f"supported: {', '.join(ARCHITECTURES)} (LLaMA-family decoders)",
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise PeftkitError(
            f"GGUF export does not write {rope['rope_type']!r} RoPE scaling",
            "--format gguf",
            "export a model without rope_scaling, or merge with peftkit merge and convert it with llama.cpp",
        )
    return arch


def _rope(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def halves_to_pairs(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a query or key projection from transformers' rotary layout
    (each head's dimensions in two halves, ``x_i`` rotating with ``x_{i+d/2}``) to llama.cpp's
    (``x_{2i}`` with ``x_{2i+1}``). ``rows``: ``(heads * head_dim, ...)``; a weight, a bias or a
    LoRA ``B``."""
    shape = rows.shape
    per_head = shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


# ---- the tokenizer ----
@dataclass
class Vocabulary:
    """What llama.cpp needs to tokenize like the transformers tokenizer did."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    warning: str | None = None  # said to the user when tokenization may differ


def vocabulary(tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Vocabulary:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary, padded to the model's
    ``vocab_size``. ``stop_ids``: where a reply ends, the first is written as EOS and a second
    (a chat template's end-of-turn token) as EOT.

    Raises:
        PeftkitError: a tokenizer that is not byte-level BPE (SentencePiece, WordPiece, word-level).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise PeftkitError(
            "GGUF export writes byte-level BPE tokenizers only (GPT-2, LLaMA 3, Qwen2, SmolLM style)",
            "--format gguf",
            "use a model with such a tokenizer",
        )
    pre, warning = _pre_tokenizer(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # unused
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if added[i]["special"] else 4)  # control, user-defined
        else:
            tokens.append(by_id[i])
            types.append(1)  # normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": stop_ids[0] if stop_ids else tokenizer.eos_token_id,
        "eot": stop_ids[1] if len(stop_ids) > 1 else None,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    probe = tokenizer("a")["input_ids"]
    return Vocabulary(
        tokens,
        types,
        merges,
        pre,
        {k: int(v) for k, v in special.items() if v is not None},
        add_bos=bool(probe) and probe[0] == tokenizer.bos_token_id,
        add_eos=bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1,
        chat_template=getattr(tokenizer, "chat_template", None) or None,
        warning=warning,
    )


def _byte_level(pre: dict | None) -> bool:
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer(pre: dict | None) -> tuple[str, str | None]:
    """llama.cpp's name for how the text is split into words before BPE, and a warning when
    no name matches (llama.cpp then splits with its default rule, which may differ)."""
    parts = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", None
    if kinds == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe", None
        if regex == _QWEN2_SPLIT:
            return "qwen2", None
    return "default", (
        f"llama.cpp knows no name for this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}); "
        "it will split words its default way, so its tokens may differ from transformers' on some texts"
    )


# ---- writing ----
def _as_stored(data: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as GGUF stores it: float32 for 1-D ones, else in ``dtype`` (q8_0 falls back to
    f16 for rows that are not whole blocks of 32)."""
    import gguf

    arr = data.detach().float().cpu().numpy()
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or dtype == "f32":
        return arr, q.F32
    if dtype == "f16" or (dtype == "q8_0" and arr.shape[-1] % 32):
        return arr.astype(np.float16), q.F16
    kind = q.BF16 if dtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(arr, kind), kind


def _hyper_parameters(writer: Any, config: Any, arch: str) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    head = _head_dim(config)
    writer.add_rope_dimension_count(head)
    if head != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head)
        writer.add_value_length(head)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    theta = _rope(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(int(config.vocab_size))


def _add_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, token in vocab.special.items():
        adders[key](token)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


class _Names:
    """transformers parameter names -> llama.cpp tensor names, and which rows to reorder."""

    def __init__(self, config: Any, arch: str):
        import gguf

        kind = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
        self.map = gguf.get_tensor_name_map(kind, int(config.num_hidden_layers))
        self.heads = {
            "q_proj": int(config.num_attention_heads),
            "k_proj": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        }
        self.permute = arch == "llama"

    def name(self, key: str) -> str:
        found = self.map.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise PeftkitError(f"no GGUF name for the tensor {key!r}", "--format gguf", "export a plain model")
        return found

    def rows(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (rows = the output features of ``key``'s layer) in llama.cpp's order."""
        parts = key.split(".")
        layer = next((p for p in parts if p in self.heads), None)
        if self.permute and layer is not None:
            return halves_to_pairs(tensor, self.heads[layer])
        return tensor


def write_model(path: Path, model: Any, vocab: Vocabulary, dtype: str, name: str) -> None:
    """Write ``model`` (a plain transformers causal LM: merged, unloaded, float) as one GGUF file,
    with the tokenizer as :func:`vocabulary` describes it."""
    import gguf

    config = model.config
    arch = architecture(config)
    names = _Names(config, arch)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _hyper_parameters(writer, config, arch)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocabulary(writer, vocab)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the embedding matrix when there is no output.weight
        data, kind = _as_stored(names.rows(key, tensor), dtype)
        writer.add_tensor(names.name(key), data, raw_dtype=kind)
    _finish(writer)


@dataclass
class LoraFactors:
    """One adapter's LoRA pairs under llama.cpp's names, scaled for one alpha."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor name -> (A (r, in), B (out, r))
    alpha: float


def lora_factors(model: Any, adapter: str) -> LoraFactors:
    """The LoRA factors of ``adapter`` on a loaded model, as llama.cpp applies them.

    Raises:
        PeftkitError: an update that is not plain LoRA on a weight llama.cpp knows.
    """
    from ..methods.layer import AdaptedLinear
    from ..methods.lora import LoRAUpdate

    config = model.config
    names = _Names(config, architecture(config))
    found: list[tuple[str, LoRAUpdate]] = []
    for key, module in model.named_modules():
        if not isinstance(module, AdaptedLinear):
            continue
        update = module.update_of(adapter)
        if update is None:
            continue
        if not isinstance(update, LoRAUpdate) or not update.plain or update.initial is not None:
            raise _not_plain(f"the update on {key}")
        found.append((key, update))
    if not found:
        raise _not_plain("the adapter has no LoRA layers")
    first = found[0][1]
    alpha = float(first.scaling * first.r)  # llama.cpp: alpha / r; the first layer's as it is
    pairs = {}
    for key, update in found:
        weight = names.name(f"{_plain_key(key)}.weight")
        a = update.lora_A.weight.detach().float()
        b = update.lora_B.weight.detach().float() * (update.scaling * update.r / alpha)
        pairs[weight] = (a, names.rows(_plain_key(key), b))
    return LoraFactors(pairs, alpha)


def _plain_key(module_key: str) -> str:
    """A wrapped module's name as the plain model names its weight's module."""
    return module_key.removeprefix("base_model.model.")


def _not_plain(what: str) -> PeftkitError:
    return PeftkitError(
        f"--adapter-only writes plain LoRA adapters, and {what} is not one",
        "--adapter-only",
        "drop --adapter-only to export the merged model (DoRA, LoRA bias, PiSSA/OLoRA and other methods merge)",
    )


def write_lora(path: Path, factors: LoraFactors, config: Any, name: str) -> None:
    """Write LoRA factors as a GGUF adapter for ``Llama(lora_path=...)`` and Ollama's ``ADAPTER``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture(config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, factors.alpha)
    for weight, (a, b) in factors.pairs.items():
        writer.add_tensor(f"{weight}.lora_a", a.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.add_tensor(f"{weight}.lora_b", b.contiguous().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
