"""Loading a base model and its tokenizer for a task, from an asset name, folder or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .assets import resolve_model
from .errors import PeftkitError


@dataclass
class LoadedBase:
    """A freshly loaded base model.

    Attributes:
        model: the transformers model (task head included, untrained if new).
        tokenizer: its tokenizer, with a pad token set.
        newly_initialized: modules whose weights the checkpoint lacked (the new head).
    """

    model: nn.Module
    tokenizer: Any
    newly_initialized: list[str]


def quiet_transformers() -> None:
    """Keep transformers' load reports and progress bars off the user's terminal."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise PeftkitError(
            f"cannot load a tokenizer for '{name}': {_first_line(exc)}",
            "model",
            "give a packaged name (minilm), a local model folder, or a reachable hub id",
        ) from None
    if tok.pad_token is None:  # decoder tokenizers often have none; padding needs one
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_classifier(name: str, label_names: list[str]) -> LoadedBase:
    """A sequence-classification model with a head of ``len(label_names)`` outputs.

    Raises:
        PeftkitError: the model cannot be loaded or has no classification head class.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    tokenizer = load_tokenizer(name)
    path = resolve_model(name)
    id2label = dict(enumerate(label_names))
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
            output_loading_info=True,
        )
    except Exception as exc:
        raise PeftkitError(
            f"cannot load '{name}' as a sequence classifier: {_first_line(exc)}",
            "model",
            "use a model whose family has a ...ForSequenceClassification class",
        ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())})
    return LoadedBase(model, tokenizer, new)


def load_causal_lm(name: str) -> LoadedBase:
    """A ``...ForCausalLM`` model (LM head included) and its tokenizer.

    Raises:
        PeftkitError: the model cannot be loaded as a causal LM.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name))
    except Exception as exc:
        raise PeftkitError(
            f"cannot load '{name}' as a causal LM: {_first_line(exc)}",
            "model",
            "use a decoder model (LLaMA, Qwen2, Mistral, SmolLM, GPT-2...)",
        ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedBase(model, tokenizer, [])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
