"""``peftkit export``: an adapter where models run, outside transformers.

- :func:`export_gguf`: a causal-LM adapter as a GGUF model (merged), or a GGUF LoRA adapter beside
  its base, with an Ollama ``Modelfile`` (:mod:`.gguf`, :mod:`.modelfile`);
- :func:`export_onnx`: a classification adapter, merged, as an ONNX graph with its tokenizer,
  labels and a script that runs it with ONNX Runtime alone (:mod:`.onnx`).

Each loads the adapter through the one inference path (:func:`peftkit.multi.load_named`), checks
everything it can before writing, and writes the output folder atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeftkitError
from ..fsio import atomic_dir

#: file names inside the output folder
MODEL, ADAPTER, BASE, MODELFILE = "model.gguf", "adapter.gguf", "base.gguf", "Modelfile"


@dataclass
class Exported:
    """What an export wrote, and what the user should know about it."""

    folder: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


def _check_output(output: str | Path, overwrite: bool) -> Path:
    from ..predict import check_merge_output

    return check_merge_output(output, overwrite)


def _load(adapter: str | Path, model: str | None, quantize: int | None, want: str, check: Any = None) -> Any:
    """The adapter loaded on its base, seen alone; refused on one line before the base loads
    when it is not a ``want`` adapter or ``check(files)`` raises."""
    from ..adapter_io import read_adapter
    from ..models import quiet_transformers
    from ..multi import DEFAULT_NAME, adapter_task, classifier, language_model, load_named

    files = read_adapter(adapter)
    task = adapter_task(files)
    if task != want:
        fmt, other = ("gguf", "onnx") if want == "causal_lm" else ("onnx", "gguf")
        kind = {"causal_lm": "a causal-LM", "classification": "a classification", "reward": "a reward"}[task]
        raise PeftkitError(
            f"{kind} adapter cannot be exported as {fmt.upper()}",
            str(adapter),
            f"use --format {other}" if task != "reward" else "reward models are not exported yet",
        )
    if check is not None:
        check(files)
    quiet_transformers()
    named = load_named([(DEFAULT_NAME, Path(adapter))], model, quantize)
    return (language_model if want == "causal_lm" else classifier)(named, DEFAULT_NAME)


def _dequantized_note(quantize: int | None) -> list[str]:
    if not quantize:
        return []
    return [
        f"the base was loaded {quantize}-bit: the file holds its dequantized weights (what the adapter "
        "was trained against), not the original float ones"
    ]


def export_gguf(
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str = "f16",
    adapter_only: bool = False,
    with_base: bool = False,
    quantize: int | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> Exported:
    """Export a causal-LM adapter for llama.cpp and Ollama.

    Writes ``model.gguf`` (the merged model in ``dtype``) or, with ``adapter_only``,
    ``adapter.gguf`` (float32 LoRA factors) and, with ``with_base``, ``base.gguf``; and a
    ``Modelfile`` for ``ollama create``.

    Raises:
        PeftkitError: an existing ``output`` (unless ``overwrite``), a classifier adapter, an
            architecture or tokenizer llama.cpp cannot take as written here, ``adapter_only`` for
            an adapter that is not plain LoRA, ``with_base`` without ``adapter_only``.
    """
    from ..quantize import dequantize_model
    from . import gguf
    from .modelfile import chat_wraps, modelfile

    if dtype not in gguf.DTYPES:
        raise PeftkitError(f"unknown GGUF dtype {dtype!r}", "--dtype", f"choose one of {', '.join(gguf.DTYPES)}")
    if with_base and not adapter_only:
        raise PeftkitError("--with-base goes with --adapter-only", "--with-base", "add --adapter-only, or drop it")
    out = _check_output(output, overwrite)
    lm = _load(adapter, model, quantize, "causal_lm", _check_plain_lora if adapter_only else None)
    config = lm.model.config
    gguf.architecture(config)
    stops = list(lm.encoder.stop_ids)
    folder = Path(adapter).resolve()
    name = folder.parent.name if folder.name == "adapter" else folder.name  # a run's adapter: the run's name
    notes = _dequantized_note(quantize)
    vocab = gguf.vocabulary(lm.tokenizer, int(config.vocab_size), stops)  # refuses before any write
    if vocab.warning:
        notes.append(vocab.warning)
    wraps = chat_wraps(lm.tokenizer) if lm.encoder.chat else None
    stop_texts = [lm.tokenizer.convert_ids_to_tokens(t) for t in stops]
    system = lm.adapter.meta.get("system_prompt")
    with atomic_dir(out) as tmp:
        if adapter_only:
            factors = gguf.lora_factors(lm.model, lm.name)
            gguf.write_lora(tmp / ADAPTER, factors, config, f"{name} (LoRA)")
            files = [ADAPTER]
            if with_base:
                dequantize_model(lm.model)
                gguf.write_model(tmp / BASE, _Plain(lm.model), vocab, dtype, lm.base_model)
                files.append(BASE)
            else:
                notes.append(f"the Modelfile's FROM names {BASE}: put the base model there as GGUF (--with-base)")
            text = modelfile(BASE, ADAPTER, wraps, stop_texts, system, f"peftkit export of {name} (LoRA on its base)")
        else:
            from ..predict import CHECK_TEXTS, lm_logits, merge_view

            check = merge_view(lm, lambda: lm_logits(lm, CHECK_TEXTS))
            gguf.write_model(tmp / MODEL, lm.model, vocab, dtype, name)
            files = [MODEL]
            notes.append(f"merged in float32: the logits moved by at most {check.diff:.2e} (largest {check.scale:.3g})")
            text = modelfile(MODEL, None, wraps, stop_texts, system, f"peftkit export of {name} (merged, {dtype})")
        if lm.encoder.chat and wraps is None:
            notes.append("the chat template has no Ollama translation here: the Modelfile leaves it to Ollama")
        (tmp / MODELFILE).write_text(text)
        files.append(MODELFILE)
    return Exported(out, files, notes)


class _Plain:
    """A model with adapters attached, seen as its base alone: ``state_dict`` without the
    adapters' tensors, under the plain model's names (the file-format boundary)."""

    def __init__(self, model: Any):
        self.model, self.config = model, model.config

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for key, value in self.model.state_dict().items():
            if ".updates." in key or "peftkit" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
        return state


def _check_plain_lora(files: Any) -> None:
    """Refuse, on one line, an adapter llama.cpp's LoRA cannot apply as it is."""
    cfg = files.method_config()
    extras = files.config.get("modules_to_save") or files.config.get("trainable_token_indices")
    if cfg.name != "lora" or cfg.use_dora or cfg.lora_bias or cfg.residual_init or extras:
        what = (
            cfg.name
            if cfg.name != "lora"
            else "DoRA"
            if cfg.use_dora
            else "LoRA with a bias"
            if cfg.lora_bias
            else f"{cfg.residual_init} (its base is changed)"
            if cfg.residual_init
            else "LoRA with modules_to_save or trainable tokens"
        )
        raise PeftkitError(
            f"--adapter-only writes plain LoRA adapters, not {what}",
            "--adapter-only",
            "drop --adapter-only to export the merged model",
        )


def export_onnx(
    adapter: str | Path,
    output: str | Path,
    *,
    int8: bool = False,
    quantize: int | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> Exported:
    """Export a classification adapter, merged, for ONNX Runtime (:mod:`.onnx`): ``model.onnx``
    (float32), with ``int8`` also ``model.int8.onnx``, and the files ``classify.py`` needs.

    Raises:
        PeftkitError: an existing ``output`` (unless ``overwrite``), a causal-LM adapter, a method
            that cannot merge.
    """
    from ..predict import CHECK_TEXTS, merge_view
    from . import onnx

    out = _check_output(output, overwrite)
    clf = _load(adapter, model, quantize, "classification")
    check = merge_view(clf, lambda: clf.logits(CHECK_TEXTS))
    notes = _dequantized_note(quantize)
    notes.append(f"merged in float32: the logits moved by at most {check.diff:.2e}")
    with atomic_dir(out) as tmp:
        onnx.write_onnx(clf.model, clf.tokenizer, tmp, CHECK_TEXTS, clf.max_length)
        files = [onnx.MODEL]
        if int8:
            onnx.quantize_int8(tmp)
            files.append(onnx.INT8)
        onnx.write_runtime(tmp, clf.tokenizer, clf.label_names, clf.max_length)
        files += ["tokenizer.json", onnx.SPEC, onnx.SCRIPT]
    return Exported(out, files, notes)
