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
from ..quantize import dequantized_weight, is_quantized
from .base import Attached, Attachment
from .configs import LoraConfig
from .layer import DEFAULT, AdaptedLinear, Update, chosen_layers, wrap_targets


class LoRAUpdate(Update):
    """One LoRA adapter on one frozen linear layer (``nn.Linear`` or a subclass, quantized ones
    included, or ``Conv1D``).

    Args:
        base: the frozen layer.
        r: rank.
        scaling: the factor ``s`` applied to ``B A x``.
        dropout: dropout probability on the update's input.
        bias: give ``B`` a bias (peft's ``lora_bias``).
        init: peft's ``init_lora_weights`` for the factors: True, False or ``"gaussian"`` (the
            residual inits are :func:`residual_init`'s).

    Shapes: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; input ``(..., in_features)``, output
    ``(..., out_features)``.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        *,
        bias: bool = False,
        init: bool | str = True,
    ):
        super().__init__(base)
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=self.device, dtype=self.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=bias, device=self.device, dtype=self.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        #: PiSSA/OLoRA: the factors the residual base was computed with, ``(A0, B0)``
        self.initial: tuple[torch.Tensor, torch.Tensor] | None = None
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

    def can_fuse(self) -> bool:
        """Whether :meth:`fused` computes this update (plain, without dropout)."""
        return self.plain and type(self.lora_dropout) is nn.Identity

    def tensors(self) -> dict[str, torch.Tensor]:
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_B.bias is not None:
            params["lora_B.bias"] = self.lora_B.bias
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    # ---- DoRA ----
    def base_weight(self, base: nn.Module) -> torch.Tensor:
        """The frozen weight as ``(out, in)`` in the factors' dtype (dequantized where quantized)."""
        w = dequantized_weight(base) if is_quantized(base) else base.weight
        w = w.T if self.fan_in_fan_out else w
        return w.to(self.lora_A.weight.dtype)

    def weight_norm(self, base: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` of every output row, ``(out,)``, outside the autograd graph."""
        with torch.no_grad():
            return torch.linalg.norm(
                self.base_weight(base) + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1
            )

    def use_dora(self, base: nn.Module) -> None:
        """Make this a DoRA update, its magnitude starting at the current row norms."""
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(base).clone())

    def _dora(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        factor = self.lora_magnitude_vector / self.weight_norm(base)  # (out,)
        dtype = self.lora_A.weight.dtype
        dropped = self.lora_dropout(x.to(dtype))
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(base, "bias", None)
            plain = out.to(dtype) if bias is None else out.to(dtype) - bias.to(dtype)
        else:
            plain = F.linear(dropped, self.base_weight(base))
        update = (factor - 1) * plain + factor * self.lora_B(self.lora_A(dropped)) * self.scaling
        return out + update.to(out.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.lora_magnitude_vector is not None:
            return self._dora(x, out, base)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        if self.lora_B.bias is not None or (out.dtype != h.dtype and not torch.is_autocast_enabled(out.device.type)):
            return out + (self.lora_B(h) * self.scaling).to(out.dtype)
        # out + s * h B^T in one product that accumulates into a copy of the base output
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.weight.t(), alpha=self.scaling
        )
        return flat.view(out.shape)

    def fused(self, x: torch.Tensor, product: Any) -> torch.Tensor:
        """The base product and this update as one autograd node (:class:`_LinearPlusLoRA`),
        over a prepared frozen ``product`` (:class:`peftkit.accel.frozen.FrozenProduct`)."""
        return _LinearPlusLoRA.apply(x, product, self.lora_A.weight, self.lora_B.weight, self.scaling)

    @staticmethod
    def mixed_rows(
        updates: dict[int, LoRAUpdate], x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, layer: nn.Module
    ) -> torch.Tensor:
        """Inference over a mixed batch of plain LoRA rows: every slot's factors stacked once
        (ranks padded with zeros, the scale folded into ``B``) and all rows' low-rank products
        in two batched products, gathered per row (the idea of Punica and S-LoRA). DoRA and
        biased updates take the general per-adapter path."""
        if not all(u.plain for u in updates.values()):
            for s, u in updates.items():
                idx = (rows == s).nonzero().squeeze(1)
                out = out.index_copy(0, idx, u(x[idx], out[idx], layer.base_layer))
            return out
        stacks = _stacks(layer, updates)
        n = x.shape[0]
        a, b = stacks
        flat = x.reshape(n, -1, x.shape[-1]).to(a.dtype)
        delta = torch.bmm(torch.bmm(flat, a[rows]), b[rows])
        return out + delta.view(out.shape).to(out.dtype)

    # ---- merging ----
    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def _per_output(self, factor: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``(out,)`` factors shaped to scale the output rows of ``w`` in its own layout."""
        return (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)).to(w.dtype)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold the update into the base weight. For DoRA the weight becomes
        ``m / ||W + s B A|| * (W + s B A)``."""
        if self.lora_B.bias is not None and getattr(base, "bias", None) is None:
            raise PeftkitError(
                "a LoRA layer with lora_bias cannot merge into a layer without a bias",
                "merge",
                "use the adapter unmerged",
            )
        w = base.weight
        if self.lora_magnitude_vector is not None:
            self._merged_factor = self.lora_magnitude_vector / self.weight_norm(base)
            w.copy_((w + self.delta_weight().to(w.dtype)) * self._per_output(self._merged_factor, w))
        else:
            w.add_(self.delta_weight().to(w.dtype))
        if self.lora_B.bias is not None:
            base.bias.add_((self.lora_B.bias * self.scaling).to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Take a merged update out again."""
        w = base.weight
        if self._merged_factor is not None:
            w.copy_(w / self._per_output(self._merged_factor, w) - self.delta_weight().to(w.dtype))
            self._merged_factor = None
        else:
            w.sub_(self.delta_weight().to(w.dtype))
        if self.lora_B.bias is not None:
            base.bias.sub_((self.lora_B.bias * self.scaling).to(base.bias.dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}{dora}"


def _stacks(layer: nn.Module, updates: dict[int, LoRAUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors of ``updates`` by slot, ``(S, in, r)`` and ``(S, r, out)``, kept on
    ``layer`` until its slots change (inference only: the factors are frozen there)."""
    slots = len(layer.routing.slots)
    key = (
        slots,
        tuple((s, id(u), u.lora_A.weight._version, u.lora_B.weight._version) for s, u in sorted(updates.items())),
    )
    cached = layer.__dict__.get("_lora_stacks")
    if cached is not None and cached[0] == key:
        return cached[1]
    first = next(iter(updates.values()))
    rank = max(u.r for u in updates.values())
    a = torch.zeros(slots, first.in_features, rank, device=first.lora_A.weight.device, dtype=first.dtype)
    b = torch.zeros(slots, rank, first.out_features, device=a.device, dtype=a.dtype)
    for s, u in updates.items():
        a[s, :, : u.r] = u.lora_A.weight.t()
        b[s, : u.r] = u.lora_B.weight.t() * u.scaling
    layer.__dict__["_lora_stacks"] = (key, (a, b))
    return a, b


class _LinearPlusLoRA(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with a frozen ``W`` and ``b``, as one autograd node.

    Composed of modules, the update costs a cast of ``x`` of its own, a full-size product
    ``(x A^T) B^T`` and a pass adding it to the base output; its backward a full-size scaled
    gradient, a second input gradient and a pass summing the two. Here the update accumulates
    into the base product's output and the second input gradient into the first, and only the
    ``(N, r)`` tensors are scaled. Everything runs in ``base.dtype``. ``base`` is a prepared
    frozen product: ``forward(x)`` (``x W^T + b``), ``input_grad(g)`` (``g W``) and ``dtype``.

    Shapes: x ``(..., in)``, a ``(r, in)``, b ``(out, r)``; ``base`` maps ``in`` to ``out``.
    """

    @staticmethod
    def forward(ctx, x, base, a, b, scaling: float):
        ctx.base, ctx.scaling, ctx.x_meta, ctx.lora_dtype = base, scaling, (x.shape, x.dtype), a.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(base.dtype)
        a, b = a.to(base.dtype), b.to(base.dtype)
        h = x2 @ a.t()
        out = base.forward(x2).addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, a, b, h)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        # the skinny products with the long side as the inner dimension of a row-major
        # operand: as written out plainly (g @ b, g^T @ h) they took 1.7-3.9x as long in float32
        gh = (g @ b.t().contiguous().t()).mul_(ctx.scaling)  # gradient of h = x A^T
        want_x, _, want_a, want_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if want_x:
            shape, dtype = ctx.x_meta
            grad_x = ctx.base.input_grad(g).addmm_(gh, a).view(shape).to(dtype)
        if want_a:
            grad_a = (gh.t() @ x2).to(ctx.lora_dtype)
        if want_b:
            grad_b = (h.t() @ g).mul_(ctx.scaling).t().contiguous().to(ctx.lora_dtype)
        return grad_x, None, grad_a, grad_b, None


@torch.no_grad()
def residual_init(layer: LoRAUpdate, base: nn.Module, init: str) -> None:
    """Start ``layer``'s factors at ``init`` (``pissa``, ``pissa_niter_N`` or ``olora``) and leave
    the residual ``W - s B0 A0`` in the base weight, computed as peft computes it (float32).

    Raises:
        PeftkitError: a quantized base (the residual needs the full weight), or OLoRA on a
            ``Conv1D`` layer.
    """
    if is_quantized(base) or not base.weight.dtype.is_floating_point:
        raise PeftkitError(
            f"init_lora_weights={init} needs the base's full weights",
            "method.init_lora_weights",
            "initialise without quantization, or use init_lora_weights: true on a quantized base",
        )
    dtype = base.weight.dtype
    weight = base.weight.float()
    if init == "olora":
        if layer.fan_in_fan_out:
            raise PeftkitError(
                "init_lora_weights=olora does not take Conv1D layers",
                "method.init_lora_weights",
                "use pissa or the default init for GPT-2-style models",
            )
        q, r_ = torch.linalg.qr(weight)
        a, b = r_[: layer.r].contiguous(), q[:, : layer.r].contiguous()
    else:
        weight = weight.T if layer.fan_in_fan_out else weight
        if init == "pissa":
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            v, s, uh = v[:, : layer.r], s[: layer.r], uh[: layer.r]
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
        raise PeftkitError(
            "only PiSSA and OLoRA adapters convert to plain LoRA", "save", "a plain LoRA adapter is already one"
        )
    if cfg.use_dora:
        raise PeftkitError(
            f"a DoRA adapter with init_lora_weights={cfg.residual_init} cannot be converted to plain LoRA",
            "save",
            "save it as it is (it loads in peft and peftkit)",
        )
    grow = math.sqrt(2) if cfg.use_rslora else 2.0
    plain = cfg.model_copy(
        update={
            "r": 2 * cfg.r,
            "alpha": cfg.alpha * grow,
            "init_lora_weights": True,
            "rank_pattern": {k: 2 * v for k, v in cfg.rank_pattern.items()},
            "alpha_pattern": {k: v * grow for k, v in cfg.alpha_pattern.items()},
        }
    )
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        layer = module.update_of(DEFAULT) if isinstance(module, AdaptedLinear) else None
        if isinstance(layer, LoRAUpdate) and layer.initial is not None:
            a0, b0 = layer.initial
            state[f"{name}.lora_A.weight"] = torch.cat([layer.lora_A.weight.detach(), a0.to(layer.lora_A.weight)])
            state[f"{name}.lora_B.weight"] = torch.cat([layer.lora_B.weight.detach(), -b0.to(layer.lora_B.weight)], 1)
            if layer.lora_B.bias is not None:
                state[f"{name}.lora_B.bias"] = layer.lora_B.bias.detach()
    return plain, state


def attach_lora(model: nn.Module, cfg: LoraConfig, at: Attachment) -> Attached:
    """Give the targeted linear layers of ``model`` adapter ``at.name``'s LoRA update, in place."""
    targets = chosen_layers(model, cfg, at.modules_to_save)
    init = cfg.residual_init

    def make(path: str, base: nn.Module) -> LoRAUpdate:
        update = LoRAUpdate(
            base,
            cfg.rank_for(path),
            cfg.scaling_for(path),
            cfg.dropout,
            bias=cfg.lora_bias,
            init=True if init else cfg.init_lora_weights,
        )
        if init:
            residual_init(update, base, init)
        if cfg.use_dora:
            update.use_dora(base)
        return update

    wrap_targets(model, targets, make, at.name, at.routing)
    return Attached(replaced=targets)
