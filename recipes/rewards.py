"""Reward functions for the GRPO recipes (``rewards: [{function: recipes/rewards.py:NAME}]``).

Each is called as TRL calls its reward functions: keyword arguments ``prompts``, ``completions``
(one entry per sampled completion) and the dataset's other columns, one value per completion.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z]+")


def right_label(completions: list, label: list, **_: object) -> list[float]:
    """1 when the answer is exactly the review's label (``positive`` or ``negative``; any case,
    a final full stop allowed), else 0: the right label in the right format."""
    out = []
    for completion, want in zip(completions, label):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        answer = text.strip().rstrip(".").strip().lower()
        out.append(1.0 if answer == str(want).lower() else 0.0)
    return out


def says_a_label(completions: list, **_: object) -> list[float]:
    """1 when the answer is one of the two label words (right or wrong), else 0: the format alone."""
    out = []
    for completion in completions:
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if text.strip().rstrip(".").strip().lower() in ("positive", "negative") else 0.0)
    return out
