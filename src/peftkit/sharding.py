"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every transformer block becomes one FSDP unit and the model itself the root unit (embeddings,
final norm, head, a task head): each process holds ``1 / N`` of every parameter, frozen base
weights included, as a ``DTensor`` shard, and gathers a unit's whole parameters only while that
unit runs forward or backward. Trainable adapter tensors, their gradients and their AdamW
state are sharded the same way. Gradients are reduce-scattered as their mean over processes,
like DDP's all-reduce, so the loss normalisation the tasks already do for DDP holds.

What leaves the shards is small for a PEFT run, so it is gathered whole: the adapter file
(:func:`gathered`, then the usual writer on process 0) and the checkpoint's trainable tensors
and optimizer state (:func:`full_trainable`, :func:`full_optimizer_state`), which makes a
checkpoint the same files whatever the process count; restoring scatters them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import PeftkitError
from .methods.base import adapter_state_dict, trainable_state

#: tasks whose loss runs the model in ways FSDP units do not follow yet (the preference tasks run
#: a reference pass and evaluation on the unwrapped model, process by process)
UNSHARDED_TASKS = ("preference", "reward", "grpo")
#: methods whose training hooks read whole weights and gradients between steps (AdaLoRA's rank
#: allocator), which FSDP leaves as shards
UNSHARDED_METHODS = ("adalora",)


def check(cfg: Any, device: torch.device) -> None:
    """Refuse, on one line, what FSDP cannot train here."""
    if cfg.task in UNSHARDED_TASKS:
        raise PeftkitError(
            f"train.distributed.strategy fsdp does not train {cfg.task} runs yet",
            "train.distributed",
            "use strategy ddp (the default) for preference, reward and grpo runs",
        )
    if cfg.method.name in UNSHARDED_METHODS:
        raise PeftkitError(
            f"train.distributed.strategy fsdp does not train {cfg.method.name} adapters yet (its rank allocator "
            "reads whole weights and gradients between steps; FSDP keeps shards)",
            "train.distributed",
            "use strategy ddp for AdaLoRA, or LoRA with a fixed rank",
        )
    if cfg.quantization is not None:
        where = (
            "bitsandbytes' quantized CPU weights cannot be sharded"
            if device.type == "cpu"
            else "FSDP over a bitsandbytes-quantized base is not checked on a GPU yet"
        )
        raise PeftkitError(
            where, "train.distributed", "drop quantization under fsdp, or use strategy ddp with a quantized base"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the modules of the classes transformers never splits
    across devices (``_no_split_modules``), or, failing that, the items of its largest
    ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> int:
    """Shard ``model`` in place over every process: one FSDP unit per block, the model the root.
    ``param_dtype``: gather and compute parameters in this dtype (FSDP's mixed precision;
    gradients are reduced in float32). Returns the number of units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = blocks(model)
    for block in units:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return len(units) + 1


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of parameters this process holds (its shards), and of the whole model."""
    from torch.distributed.tensor import DTensor

    mine = whole = 0
    for p in model.parameters():
        size = p.element_size()
        whole += p.numel() * size
        mine += (p.to_local() if isinstance(p, DTensor) else p).numel() * size
    return mine, whole


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every unit's whole parameters in place of its shards (a collective: every process enters);
    reading the model inside sees plain tensors. Writes inside are not kept."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole copies of tensors read inside :func:`gathered` (a unit that stays sharded there, the
    root's head say, is gathered tensor by tensor: every process calls this alike)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable tensors (:func:`trainable_state`), on every process."""
    with gathered(model):
        return _whole(trainable_state(model))


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of what the adapter file holds (:func:`adapter_state_dict`), on every process."""
    with gathered(model):
        return _whole(adapter_state_dict(model))


def load_trainable(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the sharded trainable ones (each process keeps its shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for key, value in trainable_state(model).items():
            whole = full[key].to(value.device, value.dtype)
            if isinstance(value, DTensor):
                whole = distribute_tensor(whole, value.device_mesh, value.placements)
            value.copy_(whole)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore :func:`full_optimizer_state`'s result into the sharded optimizer (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the norm of every process's gradient shards together."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class FullState:
    """What checkpoint writing asks of an optimizer (``state_dict()``), already gathered."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state
