"""An adapted model to and from an adapter folder (the PEFT layout of :mod:`peftkit.adapter_io`).

What a file holds comes from the method's own modules (:func:`~.base.adapter_state_dict`) and
config (``to_peft``); loading applies the method the folder describes and checks every tensor's
name and shape against the model before copying anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io import TASK_TYPES, AdapterFiles, read_adapter, read_adapter_weights, write_adapter
from ..errors import PeftkitError
from .base import Injection, adapter_state_dict, apply_method, injection_of


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model: str,
    task: str = "classification",
    meta: dict[str, Any] | None = None,
    plain_lora: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter of ``model`` (see :func:`peftkit.apply_method`) to ``directory``.

    Args:
        model: an adapted model (unwrapped from DDP).
        directory: the folder to write; replaced atomically if it exists.
        base_model: the base's name or path, stored as ``base_model_name_or_path``.
        task: the peftkit task; mapped to ``peft``'s ``task_type``.
        meta: extra facts for ``peftkit.json`` (``id2label``, ``max_length``...).
        plain_lora: write a PiSSA/OLoRA adapter as a plain LoRA adapter of the original base
            (:func:`~.lora.as_plain_lora`); always done for ``pissa_niter_N``, whose residual base
            no reader could recompute.
        state: the adapter's tensors (:func:`~.base.adapter_state_dict`'s keys), when the model's own
            cannot be read whole (sharded: :func:`peftkit.sharding.full_adapter_state`).
    """
    inj = injection_of(model)
    method = inj.method
    state = adapter_state_dict(model) if state is None else state
    niter = str(getattr(method, "residual_init", None) or "").startswith("pissa_niter_")
    if plain_lora or niter:
        from .lora import as_plain_lora

        method, lora_state = as_plain_lora(model, method)
        state = {**state, **lora_state}
    config = method.to_peft(inj, model)
    config.update(
        task_type=TASK_TYPES.get(task, task), base_model_name_or_path=base_model, inference_mode=True, revision=None
    )
    state = {method.file_key(k): v for k, v in state.items()}
    info = {"format": 1, "task": task, "base_model": base_model, **(meta or {})}
    return write_adapter(directory, config, state, info)


def load_adapter_weights(model: nn.Module, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Copy an adapter's tensors into an adapted ``model``, checking every name and shape.

    Args:
        model: a model with the adapter's method applied (same targets).
        directory: the adapter folder.
        state: its tensors if already read (:func:`~peftkit.adapter_io.read_adapter_weights`).

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
                f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model expects {tuple(target.shape)}",
                str(directory),
                fix,
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise PeftkitError(
            f"the adapter has {len(unexpected)} tensors this model has no place for (first: {unexpected[0]})",
            str(directory),
            fix,
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))


def load_adapter(
    model: nn.Module, adapter: str | Path | AdapterFiles, state: dict[str, torch.Tensor] | None = None
) -> Injection:
    """Apply the method an adapter folder describes to ``model`` and load its weights.

    Works for folders written by peftkit and by ``peft``. ``adapter`` is the folder, or its
    already read :class:`~peftkit.adapter_io.AdapterFiles` (the config is then not read again).
    Returns the :class:`Injection`.
    """
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter)
    method = files.method_config()
    injection = apply_method(model, method, list(method.modules_to_save or []))
    load_adapter_weights(model, files.path, state if state is not None else read_adapter_weights(files.path, method))
    return injection
