"""LoRA: a trainable low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (``out x in``) LoRA learns ``A`` (``r x in``) and ``B``
(``out x r``) and computes ``y = W x + b + s * B A dropout(x)`` with ``s = alpha / r``
(or ``alpha / sqrt(r)`` with rsLoRA). ``B`` starts at zero, so an untrained adapter
leaves the model unchanged. Merging adds ``s * B A`` into ``W``; unmerging subtracts it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..inject import ALL_LINEAR, is_linear, linear_shape, replace_module, select_targets
from .base import Injection, MethodConfig, finish


class LoraConfig(MethodConfig):
    """LoRA options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        ALL_LINEAR, description="name suffixes, a regex, or all-linear (PEFT semantics)"
    )
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised)")

    def apply(self, model: nn.Module, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
        return apply_lora(model, self, modules_to_save)

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # --- the Hugging Face PEFT file format -------------------------------------------
    def to_peft(self, injection: Injection, model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields as ``peft`` writes them for a LoRA adapter."""
        targets, modules_to_save = injection.replaced, injection.modules_to_save
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in targets)
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            # all-linear is stored as the layers it chose, so any reader gets the same set
            "target_modules": targets if self.target_modules == ALL_LINEAR else self.target_modules,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": modules_to_save or None,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": conv1d,  # GPT-2's Conv1D stores weights transposed
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "LoraConfig":
        """Read a ``peft`` LoRA adapter_config.json; refuses options peftkit does not implement."""
        from ..errors import PeftkitError

        unsupported = {
            "use_dora": False, "bias": "none", "layers_to_transform": None, "lora_bias": False,
            "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
            "trainable_token_indices": None, "layer_replication": None, "use_qalora": False,
        }
        for key, neutral in unsupported.items():
            if cfg.get(key, neutral) not in (neutral, None, {}, False):
                raise PeftkitError(
                    f"the adapter uses LoRA option {key}={cfg[key]!r}, which peftkit does not support",
                    "adapter_config.json",
                    "retrain without it, or load this adapter with peft",
                )
        targets = cfg.get("target_modules")
        if isinstance(targets, (list, tuple, set)):
            targets = sorted(targets)
        return cls(
            r=cfg["r"],
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0),
            target_modules=targets,
            exclude_modules=cfg.get("exclude_modules"),
            modules_to_save=list(cfg.get("modules_to_save") or []),
            use_rslora=bool(cfg.get("use_rslora", False)),
        )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update.

    Args:
        base_layer: the frozen layer (``nn.Linear`` or a subclass, or ``Conv1D``).
        r: rank.
        scaling: the factor ``s`` applied to ``B A x``.
        dropout: dropout probability on the update's input.

    Shapes:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.r, self.scaling, self.merged = r, scaling, False
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        if update.dtype == out.dtype:
            return torch.add(out, update, alpha=self.scaling)  # one pass, no scaled copy of the update
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then skips the LoRA branch."""
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged update again."""
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str]) -> Injection:
    """Wrap the targeted linear layers of ``model`` with :class:`LoRALinear`, in place.

    Args:
        model: any PyTorch model (a transformers model, usually).
        cfg: the LoRA options.
        modules_to_save: modules trained and saved whole; never wrapped.

    Returns:
        The :class:`Injection`, also stored as ``model.peftkit``.
    """
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        replace_module(model, name, LoRALinear(base, cfg.r, cfg.scaling(), cfg.dropout))
    return finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
