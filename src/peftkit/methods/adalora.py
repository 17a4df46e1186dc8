"""AdaLoRA: an SVD-shaped low-rank update whose rank budget is re-allocated during training.

Each targeted layer learns ``A`` (``r x in``), ``E`` (``r x 1``, the "singular values", starting
at zero) and ``B`` (``out x r``) and computes ``y = W x + b + s * B (E * A) dropout(x)`` with
``s = alpha / (init_r + 1e-5)``, as peft does. :class:`RankAllocator` is the training schedule
(the Injection's ``schedule``): after every optimizer step it smooths each parameter entry's
importance ``|p * grad|`` and its uncertainty, and at the steps the budget schedule says, zeroes
the least important singular values across all layers until the total rank fits the budget;
its ``penalty()`` (added to the training loss) keeps ``A``'s rows and ``B``'s columns near
orthonormal. Which ranks survive is each layer's ``rank_mask``, written as peft's
``rank_pattern``; adapter files hold only the kept ranks (peft's ``ADALORA`` layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from ..inject import is_linear, linear_shape, replace_module, select_targets
from .base import AdditiveMerge, Injection, finish
from .tuner_configs import AdaLoraConfig


class SVDLinear(AdditiveMerge, nn.Module):
    """A frozen linear layer (``nn.Linear``, quantized ones included, or ``Conv1D``) plus an
    AdaLoRA update of rank ``r`` (``init_r`` while training, the kept ranks once loaded).

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, init_r: int, alpha: float, dropout: float = 0.0,
                 kept: list[bool] | None = None):
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer, self.merged, self.r = base_layer, False, r
        self.scaling = alpha / (init_r + 1e-5)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
        self.lora_A = nn.Parameter(torch.randn(r, in_f, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(out_f, r, **kw) * 0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        mask = torch.ones(init_r, dtype=torch.bool) if kept is None else torch.tensor(kept, dtype=torch.bool)
        self.register_buffer("rank_mask", mask.to(weight.device))  # which of the init_r ranks are kept

    def adapter_params(self) -> dict[str, torch.Tensor]:
        # the mask is not trained, but checkpoints and the best state must carry it with E
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E, "rank_mask": self.rank_mask}

    def export_state(self) -> dict[str, torch.Tensor]:
        """The file's tensors: only the kept ranks (the parameters themselves, which loading
        copies into, once the layer holds those alone or nothing was pruned)."""
        if self.r != self.rank_mask.numel() or bool(self.rank_mask.all()):
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.r == 0:
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype)) @ (self.lora_A * self.lora_E).T
        return out + (h @ self.lora_B.T * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={int(self.rank_mask.sum())}/{self.rank_mask.numel()}, merged={self.merged}"


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    """peft's ``rank_pattern`` of an AdaLoRA model (see :meth:`AdaLoraConfig.kept_ranks`)."""
    injection = model.peftkit
    return injection.method.kept_ranks(injection, model)


class RankAllocator:
    """AdaLoRA's training schedule over the :class:`SVDLinear` layers of one model."""

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig):
        self.cfg, self.layers = cfg, svd_layers(model)
        self.init_budget = sum(m.r for m in self.layers.values())
        self.target_budget = cfg.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict[str, torch.Tensor] = {}
        self.avg_unc: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": getattr(m, k) for n, m in self.layers.items() for k in ("lora_A", "lora_B", "lora_E")}

    # ---- what the trainer calls ----
    def penalty(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over layers."""
        terms = []
        for m in self.layers.values():
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based), with the gradients still in place."""
        cfg = self.cfg
        final = cfg.total_step - cfg.tfinal
        if step < final:
            self._update_importance()
            budget, due = self.budget(step)
            if due:
                self._mask_to(budget)
        elif step == final:
            self._mask_to(self.target_budget)
            self.reset()
        else:  # the final phase: the kept ranks stay as they are
            for m in self.layers.values():
                m.lora_E.masked_fill_(~m.rank_mask[:, None], 0.0)

    def budget(self, step: int) -> tuple[int, bool]:
        """The total rank allowed at ``step`` and whether ranks are re-allocated then (peft's cubic)."""
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % cfg.deltaT == 0

    def _update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, p in self._params().items():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.avg_ipt.get(key, torch.zeros_like(p)) * b1 + (1 - b1) * ipt
            self.avg_unc[key] = self.avg_unc.get(key, torch.zeros_like(p)) * b2 + (1 - b2) * (ipt - avg).abs()
            self.avg_ipt[key] = avg

    def _score(self, key: str) -> torch.Tensor:
        return self.avg_ipt[key] * self.avg_unc[key]

    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` most important singular values over all layers; zero the rest."""
        if not self.avg_ipt or self.init_budget - budget <= 0:
            return
        scores = {}
        for n in self.layers:  # a triplet's score: E's, plus A's row mean and B's column mean
            a, b, e = (self._score(f"{n}.{k}") for k in ("lora_A", "lora_B", "lora_E"))
            scores[n] = e.view(-1) + a.mean(dim=1) + b.mean(dim=0)
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        for n, m in self.layers.items():
            drop = scores[n] <= threshold
            m.lora_E.masked_fill_(drop[:, None], 0.0)
            m.rank_mask.copy_(~drop)

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {"avg_ipt": dict(self.avg_ipt), "avg_unc": dict(self.avg_unc)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        self.avg_ipt = {k: v.to(params[k]) for k, v in state.get("avg_ipt", {}).items()}
        self.avg_unc = {k: v.to(params[k]) for k, v in state.get("avg_unc", {}).items()}


def apply_adalora(model: nn.Module, cfg: AdaLoraConfig, modules_to_save: list[str], tokenizer: Any = None
                  ) -> Injection:
    """Wrap the targeted linear layers with :class:`SVDLinear` (at the ranks ``cfg.rank_pattern``
    keeps, when an adapter file gave one) and attach the :class:`RankAllocator`."""
    targets = [n for n in select_targets(model, cfg.target_modules, cfg.exclude_modules, skip=modules_to_save)
               if cfg.in_layers(n)]
    if not targets:
        raise PeftkitError("no layer is left to adapt", "method.layers_to_transform", "name blocks the model has")
    pattern = cfg.rank_pattern or {}
    for name in targets:
        base = model.get_submodule(name)
        assert is_linear(base)
        kept = pattern.get(f"{name}.lora_E")
        if kept is not None and len(kept) != cfg.init_r:
            raise PeftkitError(f"rank_pattern for {name} has {len(kept)} entries, init_r is {cfg.init_r}",
                               "adapter_config.json", "save the adapter again")
        r = cfg.init_r if kept is None else sum(bool(k) for k in kept)
        replace_module(model, name, SVDLinear(base, r, cfg.init_r, cfg.alpha, cfg.dropout, kept))
    injection = finish(model, cfg, replaced=targets, modules_to_save=modules_to_save)
    if not pattern:  # a loaded adapter's ranks are settled
        injection.schedule = RankAllocator(model, cfg)
    return injection
