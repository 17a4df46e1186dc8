"""Adapters on disk in the Hugging Face PEFT layout.

A folder holds ``adapter_config.json`` (``peft``'s config keys), ``adapter_model.safetensors``
(keys ``base_model.model.<module path>.lora_A.weight``; saved heads under their plain
paths, ``base_model.model.classifier.weight``; prompt and prefix tuning use ``peft``'s
``prompt_embeddings`` and ``base_model.<path>``: each method config maps its keys) and
``peftkit.json`` with what ``peft`` has no field for (task, label names, max length).
``peft.PeftModel.from_pretrained`` loads the folder; folders written by ``peft`` load here
(without ``peftkit.json``, labels are inferred from the head's shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PeftkitError
from .fsio import atomic_dir
from .methods import METHODS, PEFT_TYPES, Injection, MethodConfig, adapter_state_dict, apply_method, injection_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
META_FILE = "peftkit.json"
TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass
class AdapterFiles:
    """What an adapter folder says, before any weights are loaded."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model") or self.config.get("base_model_name_or_path")

    def method_config(self) -> Any:
        """The peftkit method config the adapter describes."""
        peft_type = self.config.get("peft_type")
        name = PEFT_TYPES.get(peft_type)
        if name is None:
            raise PeftkitError(f"adapter type {peft_type!r} is not supported", str(self.path / CONFIG_FILE),
                               f"supported: {', '.join(PEFT_TYPES)}")
        return METHODS[name].from_peft(self.config)


def save_adapter(model: nn.Module, directory: str | Path, *, base_model: str,
                 task: str = "classification", meta: dict[str, Any] | None = None) -> Path:
    """Write the adapter of ``model`` (see :func:`peftkit.apply_method`) to ``directory``.

    Args:
        model: an adapted model (unwrapped from DDP).
        directory: the folder to write; replaced atomically if it exists.
        base_model: the base's name or path, stored as ``base_model_name_or_path``.
        task: the peftkit task; mapped to ``peft``'s ``task_type``.
        meta: extra facts for ``peftkit.json`` (``id2label``, ``max_length``...).
    """
    from safetensors.torch import save_file

    inj = injection_of(model)
    config = inj.method.to_peft(inj, model)
    config.update(task_type=TASK_TYPES.get(task, task), base_model_name_or_path=base_model,
                  inference_mode=True, revision=None)
    state = {inj.method.file_key(k): v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    info = {"format": 1, "task": task, "base_model": base_model, **(meta or {})}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(directory)


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read an adapter folder's config files.

    Raises:
        PeftkitError: no such folder, no adapter_config.json, or malformed JSON.
    """
    path = Path(directory)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise PeftkitError("not an adapter folder (no adapter_config.json)", str(path),
                           "pass the adapter/ folder of a run, or a peft adapter folder")
    files = AdapterFiles(path, _read_json(cfg_path))
    if (path / META_FILE).is_file():
        files.meta = _read_json(path / META_FILE)
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeftkitError(f"cannot read JSON: {exc}", str(path), "restore or rewrite the file") from None
    if not isinstance(data, dict):
        raise PeftkitError("expected a JSON object", str(path))
    return data


def read_adapter_weights(directory: str | Path, method: MethodConfig | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module path (the file's prefixes removed).

    Args:
        directory: the adapter folder.
        method: its method config (:meth:`AdapterFiles.method_config`); read from the folder if omitted.
    """
    path = Path(directory)
    try:
        if (path / WEIGHTS_FILE).is_file():
            from safetensors.torch import load_file

            state = load_file(str(path / WEIGHTS_FILE))
        elif (path / LEGACY_WEIGHTS_FILE).is_file():
            state = torch.load(path / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        else:
            raise PeftkitError(f"no {WEIGHTS_FILE} in the adapter folder", str(path), "save the adapter again")
    except PeftkitError:
        raise
    except Exception as exc:
        raise PeftkitError(f"cannot read adapter weights: {str(exc)[:200]}", str(path),
                           "the file is damaged; save the adapter again") from None
    if method is None:
        method = read_adapter(path).method_config()
    return {method.model_key(k): v for k, v in state.items()}


def load_adapter_weights(model: nn.Module, directory: str | Path,
                         state: dict[str, torch.Tensor] | None = None) -> None:
    """Copy an adapter's tensors into an adapted ``model``, checking every name and shape.

    Args:
        model: a model with the adapter's method applied (same targets).
        directory: the adapter folder.
        state: its tensors if already read (:func:`read_adapter_weights`).

    Raises:
        PeftkitError: tensors missing, unexpected, or of the wrong shape for this base.
    """
    if state is None:
        state = read_adapter_weights(directory, injection_of(model).method)
    expected = adapter_state_dict(model)
    fix = "load it onto the base model it was trained with (--model)"
    for key, target in expected.items():
        if key not in state:
            raise PeftkitError(f"the adapter has no tensor for {key}", str(directory), fix)
        if tuple(state[key].shape) != tuple(target.shape):
            raise PeftkitError(
                f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(target.shape)}", str(directory), fix)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise PeftkitError(f"the adapter has {len(unexpected)} tensors this model has no place for "
                           f"(first: {unexpected[0]})", str(directory), fix)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))


def load_adapter(model: nn.Module, directory: str | Path,
                 state: dict[str, torch.Tensor] | None = None) -> Injection:
    """Apply the method an adapter folder describes to ``model`` and load its weights.

    Works for folders written by peftkit and by ``peft``. Returns the :class:`Injection`.
    """
    method = read_adapter(directory).method_config()
    injection = apply_method(model, method, list(method.modules_to_save or []))
    load_adapter_weights(model, directory, state if state is not None else read_adapter_weights(directory, method))
    return injection


def head_size(state: dict[str, torch.Tensor], modules_to_save: list[str]) -> int | None:
    """The number of labels a saved classification head has (its smallest output size)."""
    sizes = [t.shape[0] for k, t in state.items()
             if k.endswith(".weight") and t.ndim == 2 and any(k.startswith(m + ".") for m in modules_to_save)]
    return min(sizes) if sizes else None

