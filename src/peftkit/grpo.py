"""GRPO's arithmetic: group-normalised advantages and the clipped policy loss over completion tokens.

The pieces an online-RL step needs once completions are sampled and scored (what generates and
scores them is the task's business). Names and defaults follow TRL's ``GRPOTrainer`` (1.16), whose
computation ``tests/test_grpo.py`` checks these against:

- advantages: each completion's reward less the mean of its prompt's group of ``num_generations``,
  divided by the group's standard deviation (``scale_rewards="group"``, the paper's), the whole
  batch's (``"batch"``) or not at all (``"none"``, Dr. GRPO);
- the per-token loss ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)`` with ``r`` the ratio of the
  policy's probability to the one the completion was sampled with, plus ``beta`` times the
  ``k3`` estimate of the KL divergence from the reference (weighed by ``r``, as TRL does by default);
- reduced per ``loss_type``: ``grpo`` (mean over each completion's tokens, then over completions),
  ``dapo`` (TRL's default: over all completion tokens of the batch), ``dr_grpo`` (over completions
  times ``max_completion_length``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """``(N,)`` advantages of ``N = prompts x num_generations`` rewards, grouped by prompt (each
    prompt's completions adjacent). Standard deviations are the unbiased ones, plus 1e-4."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards {scale!r} is not one of {SCALES}")
    grouped = rewards.view(-1, num_generations)
    advantages = rewards - grouped.mean(1).repeat_interleave(num_generations)
    if scale == "group":
        spread = grouped.std(1).repeat_interleave(num_generations) if num_generations > 1 else 0 * rewards
        advantages = advantages / (spread + 1e-4)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if rewards.numel() > 1 else 0 * rewards[0]) + 1e-4)
    return advantages


def completion_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(rows, completion_length)`` log-probabilities of the last ``completion_length`` tokens of
    ``input_ids`` (a prompt, then its completion), from the logits divided by the sampling
    ``temperature``: the distribution the completion was drawn from. 0 where ``attention_mask``
    is 0 (padding after a short completion), as TRL has them, so no ratio there overflows.
    ``position_ids``: as the sampler counted them (TRL passes none: a left-padded prompt's
    positions then start at its padding)."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_length + 1,
    ).logits
    logits = logits[:, -completion_length - 1 : -1].float() / temperature
    targets = input_ids[:, -completion_length:]
    logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets[..., None]).squeeze(-1)
    return torch.where(attention_mask[:, -completion_length:].bool(), logps, 0.0)


@dataclass
class PolicyLoss:
    """The loss of one batch and what the log reports of it."""

    loss: torch.Tensor
    clipped: float  # share of completion tokens whose ratio left [1 - eps, 1 + eps_high]
    kl: float | None  # mean k3 KL per completion token, when beta > 0


def policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_tokens: float | None = None,
    bias_correction_kl: bool = True,
) -> PolicyLoss:
    """GRPO's loss over completion tokens.

    Args:
        logps: ``(rows, T)`` the policy's token log-probabilities (with their graph).
        advantages: ``(rows,)``.
        mask: ``(rows, T)`` 1 on completion tokens that count (0 on padding, on truncated
            completions when those are masked).
        old_logps: the log-probabilities the completions were sampled with (None: ``logps``
            detached, one update per generation batch).
        ref_logps: the reference's, needed when ``beta > 0``.
        max_completion_length: ``dr_grpo``'s constant denominator (default ``T``).
        num_tokens: ``dapo``'s denominator, the completion tokens of the whole generation batch
            (every process's); default ``mask.sum()``.
        bias_correction_kl: weigh the KL estimate by the importance ratio (TRL's
            ``use_bias_correction_kl``, on by default): the completions were sampled by the old
            policy, the KL is the current one's.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl = float((per_token_kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_completion_length or per_token.shape[1]))
    else:
        denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype)
        loss = (per_token * mask).sum() / denominator.clamp(min=1.0)
    outside = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    clipped = float((outside.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0))
    return PolicyLoss(loss, clipped, kl)
