"""Adapters on disk in the Hugging Face PEFT layout.

A folder holds ``adapter_config.json`` (``peft``'s config keys), ``adapter_model.safetensors``
(keys ``base_model.model.<module path>.lora_A.weight``; saved heads under their plain
paths, ``base_model.model.classifier.weight``; prompt and prefix tuning use ``peft``'s
``prompt_embeddings`` and ``base_model.<path>``: each method config maps its keys) and
``peftkit.json`` with what ``peft`` has no field for (task, label names, max length).
``peft.PeftModel.from_pretrained`` loads the folder; folders written by ``peft`` load here
(without ``peftkit.json``, labels are inferred from the head's shape).

This module is the file format alone: reading and writing folders of config and tensors.
Putting an adapter onto a model is :mod:`peftkit.methods.saving`'s work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PeftkitError
from .fsio import atomic_dir
from .methods.configs import MethodConfig
from .methods.registry import METHODS, PEFT_TYPES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
META_FILE = "peftkit.json"
TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "reward": "SEQ_CLS"}


@dataclass
class AdapterFiles:
    """What an adapter folder says, before any weights are loaded."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    _method: Any = field(default=None, repr=False, compare=False)

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model") or self.config.get("base_model_name_or_path")

    def method_config(self) -> Any:
        """The peftkit method config the adapter describes (read from the config once)."""
        if self._method is None:
            self._method = self._read_method()
        return self._method

    def _read_method(self) -> Any:
        peft_type = self.config.get("peft_type")
        name = PEFT_TYPES.get(peft_type)
        if name is None:
            raise PeftkitError(
                f"adapter type {peft_type!r} is not supported",
                str(self.path / CONFIG_FILE),
                f"supported: {', '.join(PEFT_TYPES)}",
            )
        return METHODS[name].config.from_peft(self.config)


def write_adapter(
    directory: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write an adapter folder atomically: ``config`` as adapter_config.json, ``state`` (file keys)
    as adapter_model.safetensors and ``meta`` as peftkit.json; an existing folder is replaced whole."""
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
    return Path(directory)


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read an adapter folder's config files.

    Raises:
        PeftkitError: no such folder, no adapter_config.json, or malformed JSON.
    """
    path = Path(directory)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise PeftkitError(
            "not an adapter folder (no adapter_config.json)",
            str(path),
            "pass the adapter/ folder of a run, or a peft adapter folder",
        )
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
        raise PeftkitError(
            f"cannot read adapter weights: {str(exc)[:200]}", str(path), "the file is damaged; save the adapter again"
        ) from None
    if method is None:
        method = read_adapter(path).method_config()
    return {method.model_key(k): v for k, v in state.items()}


def head_size(state: dict[str, torch.Tensor], modules_to_save: list[str]) -> int | None:
    """The number of labels a saved classification head has (its smallest output size)."""
    sizes = [
        t.shape[0]
        for k, t in state.items()
        if k.endswith(".weight") and t.ndim == 2 and any(k.startswith(m + ".") for m in modules_to_save)
    ]
    return min(sizes) if sizes else None
