"""LoHa and LoKr (from the LyCORIS family): a frozen ``nn.Linear`` plus an update matrix built
from small factors, ``y = W x + b + dW x``.

- **LoHa**: ``dW = s * (W1a W1b) * (W2a W2b)`` (element-wise product of two rank-``r`` products;
  ``W2b`` starts at zero).
- **LoKr**: ``dW = s * kron(W1, W2)``, where ``out = a * b`` and ``in = c * d`` are split by
  :func:`factorization`, ``W1`` is ``a x c`` (starting at zero) and ``W2`` is ``b x d``; a factor
  is itself a rank-``r`` product ``Wa Wb`` when ``r`` is under half its larger side (for ``W1``
  only with ``decompose_both``).

``s = alpha / r``. The forward pass never builds ``dW``: LoHa's update is a rank ``r^2``
product, LoKr's two small matrix products. During training, ``module_dropout`` skips a layer's
whole update and ``rank_dropout`` drops rows of ``dW`` (rescaling the rest for LoHa, and for LoKr with
``rank_dropout_scale``). Parameter names, shapes and file keys follow peft's ``LOHA`` and
``LOKR`` types; both take ``nn.Linear`` layers only (not GPT-2's ``Conv1D``), as peft does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PeftkitError
from .base import Attached, Attachment
from .layer import AdditiveUpdate, chosen_layers, wrap_targets
from .tuner_configs import LoHaConfig, LoKrConfig, LycorisConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's split of ``dimension`` into ``(m, n)`` with ``m * n == dimension``: ``(factor,
    dimension // factor)`` when ``factor`` divides it (in that order); else the divisor pair
    nearest the square root whose small side stays within ``factor`` (-1: no limit), small side first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


def _kaiming(*shape: int, device: Any, dtype: torch.dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def _zeros(*shape: int, device: Any, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))


class FactoredUpdate(AdditiveUpdate):
    """An update ``dW x`` built from small factors, on a frozen ``nn.Linear``; subclasses own the
    factors (registered as parameters under peft's names, listed in ``factor_names``)."""

    factor_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, scaling: float, rank_dropout: float, module_dropout: float, rescale_rows: bool):
        super().__init__(base)
        if self.fan_in_fan_out:
            raise PeftkitError(
                f"{type(self).__name__} takes nn.Linear layers, not GPT-2's Conv1D",
                "method.name",
                "use lora, vera, adalora or ia3 for GPT-2-style models",
            )
        self.scaling, self.rank_dropout, self.module_dropout = scaling, rank_dropout, module_dropout
        self.rescale_rows = rescale_rows

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.factor_names if getattr(self, name, None) is not None}

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``dW x`` without building ``dW`` (``x`` in the factors' dtype)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return out
        update = self.update(x.to(self.dtype))
        if self.training and self.rank_dropout:  # dropping rows of dW drops those outputs of dW x
            keep = (torch.rand(update.shape[-1], device=update.device) > self.rank_dropout).to(update.dtype)
            update = update * (keep / keep.mean() if self.rescale_rows else keep)
        return out + update.to(out.dtype)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class LoHaUpdate(FactoredUpdate):
    """LoHa: ``hada_w1_a`` / ``hada_w2_a`` ``(out, r)``, ``hada_w1_b`` / ``hada_w2_b`` ``(r, in)``."""

    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base: nn.Module, r: int, scaling: float, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__(base, scaling, rank_dropout, module_dropout, rescale_rows=True)
        kw = {"device": self.device, "dtype": self.dtype}
        self.hada_w1_a, self.hada_w1_b = _kaiming(self.out_features, r, **kw), _kaiming(r, self.in_features, **kw)
        self.hada_w2_a, self.hada_w2_b = _kaiming(self.out_features, r, **kw), _zeros(r, self.in_features, **kw)

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        # (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2): a rank r^2 product of the row-wise Kronecker
        # products of A1, A2 (out x r^2) and the column-wise ones of B1, B2 (r^2 x in)
        r = self.hada_w1_b.shape[0]
        a = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_features, r * r)
        b = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, self.in_features)
        return F.linear(F.linear(x, b), a) * self.scaling


class LoKrUpdate(FactoredUpdate):
    """LoKr: ``lokr_w1`` (or ``lokr_w1_a @ lokr_w1_b``) Kronecker ``lokr_w2`` (or ``lokr_w2_a @ lokr_w2_b``)."""

    factor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        *,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout_scale: bool = False,
    ):
        super().__init__(base, scaling, rank_dropout, module_dropout, rescale_rows=rank_dropout_scale)
        (a, b), (c, d) = (
            factorization(self.out_features, decompose_factor),
            factorization(self.in_features, decompose_factor),
        )
        kw = {"device": self.device, "dtype": self.dtype}
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = None
        self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = None
        if decompose_both and r < max(a, c) / 2:  # the small factor starts at zero either way
            self.lokr_w1_a, self.lokr_w1_b = _zeros(a, r, **kw), _kaiming(r, c, **kw)
        else:
            self.lokr_w1 = _zeros(a, c, **kw)
        if r < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = _kaiming(b, r, **kw), _kaiming(r, d, **kw)
        else:
            self.lokr_w2 = _kaiming(b, d, **kw)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self._factors()
        return torch.kron(w1, w2.contiguous()) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        # kron(W1, W2) x = vec(W1 X W2^T) with x read as the (c x d) matrix X, row-major
        w1, w2 = self._factors()
        grid = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        y = torch.matmul(torch.matmul(w1, grid), w2.T)  # (..., a, b)
        return y.reshape(*x.shape[:-1], self.out_features) * self.scaling


def _attach(
    model: nn.Module, cfg: LycorisConfig, at: Attachment, build: Callable[[nn.Module, int, float], FactoredUpdate]
) -> Attached:
    targets = chosen_layers(model, cfg, at.modules_to_save)
    wrap_targets(
        model, targets, lambda path, base: build(base, cfg.rank_for(path), cfg.scaling_for(path)), at.name, at.routing
    )
    return Attached(replaced=targets)


def attach_loha(model: nn.Module, cfg: LoHaConfig, at: Attachment) -> Attached:
    """Give the targeted linear layers of ``model`` adapter ``at.name``'s LoHa update, in place."""
    return _attach(model, cfg, at, lambda base, r, s: LoHaUpdate(base, r, s, cfg.rank_dropout, cfg.module_dropout))


def attach_lokr(model: nn.Module, cfg: LoKrConfig, at: Attachment) -> Attached:
    """Give the targeted linear layers of ``model`` adapter ``at.name``'s LoKr update, in place."""
    return _attach(
        model,
        cfg,
        at,
        lambda base, r, s: LoKrUpdate(
            base,
            r,
            s,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
            decompose_both=cfg.decompose_both,
            decompose_factor=cfg.decompose_factor,
            rank_dropout_scale=cfg.rank_dropout_scale,
        ),
    )
