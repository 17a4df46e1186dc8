"""Adapter arithmetic: several LoRA adapters of one base combined into one, with the semantics of
peft's ``add_weighted_adapter`` (the same tensors from the same inputs; DARE's random masks come
from a generator seeded here, so a seed gives the same adapter on every run).

Every combination works layer by layer, on the adapters that have the layer:

- ``cat``: the factors side by side, ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1 ...]`` (rank: the sum);
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A factors and the
  B factors are merged separately, ``A`` with weights ``sign(w s) sqrt(|w s|)`` and ``B`` with
  ``sqrt(|w s|)`` (one rank for all adapters);
- ``svd`` and the ``*_svd`` variants: the full updates ``w`` ``s B A`` are merged, and the result
  is factored back to rank ``rank`` (default: the largest rank) by a truncated SVD.

``s`` is each adapter's scaling; the result has ``alpha = r`` (scaling 1). The merges: a weighted
sum; ``magnitude_prune`` keeps each tensor's ``density`` largest magnitudes first; ``dare_*``
keeps each element with probability ``density`` and rescales by ``1/density``; ``ties`` (and
``dare_ties``) prune, then keep, per element, the values whose sign agrees with the sign of the
pruned tensors' sum, and average those weighted values over how many were kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PeftkitError

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *LINEAR_FAMILY, *SVD_FAMILY)
#: the combinations that prune, and so need a density
PRUNING = tuple(c for c in COMBINATIONS if c not in ("cat", "linear", "svd"))


@dataclass
class LoRAFactors:
    """One LoRA adapter's factors: ``layers[path] = (A (r, in), B (out, r))`` and its scaling."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    rank: int


def check_combination(combination: str, n: int, weights: list[float], density: float | None, ranks: list[int]) -> str:
    """The combination to run (one adapter: ``linear``, as peft does), after checking its options.

    Raises:
        PeftkitError: unknown combination, weights of the wrong count, a density outside (0, 1] (or
            missing where it prunes), ranks that differ where the combination needs one rank.
    """
    if combination not in COMBINATIONS:
        raise PeftkitError(
            f"unknown combination {combination!r}", "--combination", f"use one of: {', '.join(COMBINATIONS)}"
        )
    if len(weights) != n:
        raise PeftkitError(f"{len(weights)} weights for {n} adapters", "--weights", "give one weight per adapter")
    if n == 1:
        combination = "linear"
    if combination in PRUNING and (density is None or not 0 < density <= 1):
        raise PeftkitError(
            f"{combination} needs a density in (0, 1]; got {density}",
            "--density",
            "pass --density, e.g. 0.5 (the fraction of values kept)",
        )
    if combination in LINEAR_FAMILY and len(set(ranks)) > 1:
        raise PeftkitError(
            f"{combination} needs adapters of one rank; got r {', '.join(map(str, ranks))}",
            "--combination",
            "use cat or svd (or a *_svd variant), which take any ranks",
        )
    return combination


def combine_lora(
    adapters: list[LoRAFactors],
    weights: list[float],
    combination: str,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """The combined adapter's factors per layer (scaling 1) and its rank; see the module docstring.

    Layers are visited in sorted order and DARE masks drawn from ``torch.Generator`` seeded with
    ``seed``, the A factors' before the B factors'.
    """
    combination = check_combination(combination, len(adapters), weights, density, [a.rank for a in adapters])
    if combination == "cat":
        new_rank = sum(a.rank for a in adapters)
    elif combination in SVD_FAMILY:
        new_rank = rank or max(a.rank for a in adapters)
    else:
        new_rank = adapters[0].rank
    g = torch.Generator().manual_seed(seed)
    paths = sorted({p for a in adapters for p in a.layers})
    out = {}
    for path in paths:
        present = [(a, w) for a, w in zip(adapters, weights) if path in a.layers]
        if combination == "cat":
            a_f = torch.cat([a.layers[path][0] * (w * a.scaling) for a, w in present], dim=0)
            b_f = torch.cat([a.layers[path][1] for a, _ in present], dim=1)
        elif combination in SVD_FAMILY:
            deltas = [a.layers[path][1] @ a.layers[path][0] * a.scaling for a, _ in present]
            merged = _merge(combination.removesuffix("_svd"), deltas, [w for _, w in present], density, g)
            a_f, b_f = _factor(merged, new_rank)
        else:
            ws = [w * a.scaling for a, w in present]
            w_a = [math.copysign(math.sqrt(abs(x)), x) if x else 0.0 for x in ws]
            w_b = [math.sqrt(abs(x)) for x in ws]
            a_f = _merge(combination, [a.layers[path][0] for a, _ in present], w_a, density, g)
            b_f = _merge(combination, [a.layers[path][1] for a, _ in present], w_b, density, g)
        out[path] = _pad(a_f, b_f, new_rank)
    return out, new_rank


def _merge(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None, g: torch.Generator
) -> torch.Tensor:
    """One merge of same-shaped tensors (``svd`` is the weighted sum of the full updates)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [keep_random(t, density, g) for t in tensors]
    stack = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stack.dtype).view(-1, *([1] * (stack.ndim - 1)))
    if kind in ("ties", "dare_ties"):
        agree = stack.sign() == torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
        return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (stack * w).sum(0)


def keep_largest(t: torch.Tensor, density: float | None) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest magnitudes zeroed."""
    if density is None or density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def keep_random(t: torch.Tensor, density: float | None, g: torch.Generator) -> torch.Tensor:
    """DARE: each element kept with probability ``density``, the kept ones divided by it."""
    if density is None or density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float32), generator=g).to(t.dtype)
    return t * mask / density


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, in)``, ``B (out, r)`` with ``B A`` the best rank-``r`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=True)
    r = min(rank, s.shape[0])
    return vh[:r].to(delta.dtype), (u[:, :r] @ torch.diag(s[:r])).to(delta.dtype)


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to ``rank`` (a layer some adapters lack, a small SVD)."""
    if a.shape[0] == rank:
        return a.contiguous(), b.contiguous()
    a_p = a.new_zeros(rank, a.shape[1])
    b_p = b.new_zeros(b.shape[0], rank)
    a_p[: a.shape[0]], b_p[:, : b.shape[1]] = a, b
    return a_p, b_p


def combine_heads(heads: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Saved modules (classification heads) combined with the adapters' weights, tensor by tensor.

    Raises:
        PeftkitError: heads whose tensors differ in names or shapes.
    """
    keys = set(heads[0])
    for h in heads[1:]:
        if set(h) != keys or any(h[k].shape != heads[0][k].shape for k in keys):
            raise PeftkitError(
                "the adapters' heads differ in shape",
                "--adapter",
                "combine adapters trained with the same labels, or take one head (--head NAME)",
            )
    return {k: sum(w * h[k] for h, w in zip(heads, weights)) for k in sorted(keys)}
