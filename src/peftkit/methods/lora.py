"""LoRA and its variants: a trainable low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (``out x in``) LoRA learns ``A`` (``r x in``) and ``B``
(``out x r``) and computes ``y = W x + b + s * B A dropout(x)`` with ``s = alpha / r``
(or ``alpha / sqrt(r)`` with rsLoRA). ``B`` starts at zero, so an untrained adapter
leaves the model unchanged. Merging adds ``s * B A`` into ``W``; unmerging subtracts it.

The variants peft writes in the same file format:

- **DoRA** (``use_dora``): a learned magnitude ``m`` (one per output row) times the direction
  of ``W + s B A``: ``y = m / ||W + s B A||_row * (W x + s B A x) + b``, the norm treated as a
  constant in the backward pass (section 4.3 of the DoRA paper). With dropout during training
  the base part is computed again on the dropped-out input, as peft does.
- **PiSSA** / **OLoRA** inits: ``A`` and ``B`` start at the top singular directions of ``W``
  (or a QR factorisation of it) and the base keeps the residual ``W - s B0 A0``, so the model
  starts where it was. A file of such an adapter holds ``A`` and ``B`` only; loading recomputes
  the residual from the original base (:func:`residual_init`), as peft does.
- ``lora_bias``: ``B`` has a bias, scaled by ``s`` like the rest of the update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PeftkitError
from ..inject import is_linear, linear_shape, replace_module, select_targets
from .base import Injection, finish
from .configs import LoraConfig


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update.

    Args:
        base_layer: the frozen layer (``nn.Linear`` or a subclass, quantized ones included, or ``Conv1D``).
        r: rank.
        scaling: the factor ``s`` applied to ``B A x``.
        dropout: dropout probability on the update's input.
        bias: give ``B`` a bias (peft's ``lora_bias``).
        init: peft's ``init_lora_weights`` for the factors: True, False or ``"gaussian"`` (the
            residual inits are :func:`residual_init`'s).

    Shapes:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0, *,
                 bias: bool = False, init: bool | str = True):
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.r, self.scaling, self.merged = r, scaling, False
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=bias, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        self._merged_factor: torch.Tensor | None = None
        if init is not False:  # False keeps nn.Linear's own random init of both factors
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if bias:
                nn.init.zeros_(self.lora_B.bias)

    @property
    def plain(self) -> bool:
        """No DoRA magnitude and no bias: the update is ``s B A x`` alone."""
        return self.lora_magnitude_vector is None and self.lora_B.bias is None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_B.bias is not None:
            params["lora_B.bias"] = self.lora_B.bias
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    # ---- DoRA ----
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as ``(out, in)`` in the factors' dtype (dequantized where quantized)."""
        from ..quantize import dequantized_weight, is_quantized

        layer = self.base_layer
        w = dequantized_weight(layer) if is_quantized(layer) else layer.weight
        w = w.T if self.fan_in_fan_out else w
        return w.to(self.lora_A.weight.dtype)

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` of every output row, ``(out,)``, outside the autograd graph."""
        with torch.no_grad():
            return torch.linalg.norm(self.base_weight() + self.scaling * (self.lora_B.weight @ self.lora_A.weight),
                                     dim=1)

    def use_dora(self) -> None:
        """Turn this layer into a DoRA layer, its magnitude starting at the current row norms."""
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().clone())

    def _dora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        factor = self.lora_magnitude_vector / self.weight_norm()  # (out,)
        dtype = self.lora_A.weight.dtype
        dropped = self.lora_dropout(x.to(dtype))
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = out.to(dtype) if bias is None else out.to(dtype) - bias.to(dtype)
        else:
            base = F.linear(dropped, self.base_weight())
        update = (factor - 1) * base + factor * self.lora_B(self.lora_A(dropped)) * self.scaling
        return out + update.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        if self.lora_magnitude_vector is not None:
            return self._dora(x, out)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        if self.lora_B.bias is not None or (out.dtype != h.dtype and not torch.is_autocast_enabled(out.device.type)):
            return out + (self.lora_B(h) * self.scaling).to(out.dtype)
        # out + s * h B^T in one product that accumulates into a copy of the base output
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.weight.t(),
                           alpha=self.scaling)
        return flat.view(out.shape)

    # ---- merging ----
    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def _per_output(self, factor: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(out,)`` factors shaped to scale the output rows of ``w`` in its own layout."""
        return (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)).to(w.dtype)

    def _check_bias_merge(self) -> None:
        if self.lora_B.bias is not None and getattr(self.base_layer, "bias", None) is None:
            raise PeftkitError("a LoRA layer with lora_bias cannot merge into a layer without a bias", "merge",
                               "use the adapter unmerged")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward then skips the LoRA branch. For DoRA
        the weight becomes ``m / ||W + s B A|| * (W + s B A)``."""
        if self.merged:
            return
        self._check_bias_merge()
        w = self.base_layer.weight
        if self.lora_magnitude_vector is not None:
            self._merged_factor = self.lora_magnitude_vector / self.weight_norm()
            w.copy_((w + self.delta_weight().to(w.dtype)) * self._per_output(self._merged_factor, w))
        else:
            w.add_(self.delta_weight().to(w.dtype))
        if self.lora_B.bias is not None:
            self.base_layer.bias.add_((self.lora_B.bias * self.scaling).to(self.base_layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged update out again."""
        if not self.merged:
            return
        w = self.base_layer.weight
        if self._merged_factor is not None:
            w.copy_(w / self._per_output(self._merged_factor, w) - self.delta_weight().to(w.dtype))
            self._merged_factor = None
        else:
            w.sub_(self.delta_weight().to(w.dtype))
        if self.lora_B.bias is not None:
            self.base_layer.bias.sub_((self.lora_B.bias * self.scaling).to(self.base_layer.bias.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}{dora}"


@torch.no_grad()
def residual_init(layer: LoRALinear, init: str) -> None:
    """Start ``layer``'s factors at ``init`` (``pissa``, ``pissa_niter_N`` or ``olora``) and leave
    the residual ``W - s B0 A0`` in the base weight, computed as peft computes it (float32).

    Raises:
        PeftkitError: a quantized base (the residual needs the full weight), or OLoRA on a
            ``Conv1D`` layer.
    """
    from ..quantize import is_quantized

    base = layer.base_layer
    if is_quantized(base) or not base.weight.dtype.is_floating_point:
        raise PeftkitError(f"init_lora_weights={init} needs the base's full weights", "method.init_lora_weights",
                           "initialise without quantization, or use init_lora_weights: true on a quantized base")
    dtype = base.weight.dtype
    weight = base.weight.float()
    if init == "olora":
        if layer.fan_in_fan_out:
            raise PeftkitError("init_lora_weights=olora does not take Conv1D layers", "method.init_lora_weights",
                               "use pissa or the default init for GPT-2-style models")
        q, r_ = torch.linalg.qr(weight)
        a, b = r_[:layer.r].contiguous(), q[:, :layer.r].contiguous()
    else:
        weight = weight.T if layer.fan_in_fan_out else weight
        if init == "pissa":
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            v, s, uh = v[:, :layer.r], s[:layer.r], uh[:layer.r]
        else:
            v, s, u = torch.svd_lowrank(weight, layer.r, niter=int(init.rsplit("_", 1)[1]))
            uh = u.t()
        root = torch.sqrt(s / layer.scaling)
        a, b = torch.diag(root) @ uh, v @ torch.diag(root)
    residual = weight - layer.scaling * (b @ a)
    if layer.fan_in_fan_out:  # back to Conv1D's layout (OLoRA refused it above)
        residual = residual.T
    base.weight.data = residual.to(dtype).contiguous()
    layer.lora_A.weight.data = a.to(layer.lora_A.weight.dtype)
    layer.lora_B.weight.data = b.to(layer.lora_B.weight.dtype)
    layer.initial = (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())


def as_plain_lora(model: nn.Module, cfg: LoraConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A residual-init (PiSSA/OLoRA) adapter as a plain LoRA adapter of the original base: its
    config and LoRA tensors (module keys). The update relative to the original weights is
    ``s (B A - B0 A0) = s [B, -B0] [A; A0]``, so the rank doubles and alpha with it (by sqrt 2
    with rsLoRA), which keeps every layer's ``s``.

    Raises:
        PeftkitError: the adapter has no residual init, or uses DoRA (its magnitude is relative
            to the residual base and does not convert).
    """
    if not cfg.residual_init:
        raise PeftkitError("only PiSSA and OLoRA adapters convert to plain LoRA", "save",
                           "a plain LoRA adapter is already one")
    if cfg.use_dora:
        raise PeftkitError(f"a DoRA adapter with init_lora_weights={cfg.residual_init} cannot be converted "
                           "to plain LoRA", "save", "save it as it is (it loads in peft and peftkit)")
    grow = math.sqrt(2) if cfg.use_rslora else 2.0
    plain = cfg.model_copy(update={
        "r": 2 * cfg.r, "alpha": cfg.alpha * grow, "init_lora_weights": True,
        "rank_pattern": {k: 2 * v for k, v in cfg.rank_pattern.items()},
        "alpha_pattern": {k: v * grow for k, v in cfg.alpha_pattern.items()}})
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            a0, b0 = layer.initial
            state[f"{name}.lora_A.weight"] = torch.cat([layer.lora_A.weight.detach(), a0.to(layer.lora_A.weight)])
            state[f"{name}.lora_B.weight"] = torch.cat([layer.lora_B.weight.detach(), -b0.to(layer.lora_B.weight)], 1)
            if layer.lora_B.bias is not None:
                state[f"{name}.lora_B.bias"] = layer.lora_B.bias.detach()
    return plain, state


def apply_lora(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str], tokenizer: Any = None) -> Injection:
    """Wrap the targeted linear layers of ``model`` with :class:`LoRALinear`, in place.

    Args:
        model: any PyTorch model (a transformers model, usually).
        cfg: the LoRA options.
        modules_to_save: modules trained and saved whole; never wrapped.

    Returns:
        The :class:`Injection`, also stored as ``model.peftkit``.
    """
    targets = [n for n in select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
               if cfg.in_layers(n)]
    if not targets:
        raise PeftkitError(f"layers_to_transform {cfg.layers_to_transform!r} leaves no targeted layer",
                           "method.layers_to_transform", "name block indices the model has")
    init = cfg.residual_init
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        layer = LoRALinear(base, cfg.rank_for(name), cfg.scaling_for(name), cfg.dropout, bias=cfg.lora_bias,
                           init=True if init else cfg.init_lora_weights)
        if init:
            residual_init(layer, init)
        if cfg.use_dora:
            layer.use_dora()
        replace_module(model, name, layer)
    return finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
