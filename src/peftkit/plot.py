"""Loss and metric curves of one or several runs, from their ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PeftkitError


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PeftkitError("no metrics.jsonl in the run folder", str(run), "pass the output_dir of a peftkit train run")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PeftkitError(f"metrics.jsonl is damaged ({exc.msg})", str(path)) from None


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard draws it).

    The default weight grows with the number of points, so a short run is barely smoothed.
    """
    if weight is None:
        weight = min(0.9, max(0.0, 1 - 10 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


#: in order of preference; a preference run has TRL's rewards/accuracies, a GRPO run its reward
METRICS = (
    "accuracy",
    "rewards/accuracies",
    "f1",
    "exact_match",
    "valid_label_rate",
    "rewards/margins",
    "reward",
    "perplexity",
)


def run_metric(records: list[dict[str, Any]], wanted: str | None = None) -> str | None:
    """The validation metric to draw: ``wanted`` when the run's evaluations carry it, else the
    first of :data:`METRICS` they carry (a plain-text LM run has perplexity, not accuracy)."""
    evals = [r for r in records if r.get("type") == "eval"]
    for name in ([wanted] if wanted else []) + list(METRICS):
        if evals and all(name in r for r in evals):
            return name
    return None


def plot_runs(runs: list[str | Path], output: str | Path, metric: str | None = None) -> Path:
    """Draw training loss (raw and smoothed), validation loss and the task metric against steps.

    One run: its best step is marked. Several runs: overlaid, one colour each. ``metric``:
    the validation metric to draw where a run has it (default: accuracy, else what the run has).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    records = {run: read_metrics(run) for run in runs}
    names = {run: run_metric(rs, metric) for run, rs in records.items()}
    title = " / ".join(sorted(set(names.values()) - {None})) or "metric"
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, run in enumerate(runs):
        color = colors[n % len(colors)]
        label = run.name if len(runs) > 1 else ""
        train = [r for r in records[run] if r["type"] == "train"]
        val = [r for r in records[run] if r["type"] == "eval" and r.get("split") == "validation"]
        name = names[run]
        if train:
            steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
            ax_loss.plot(steps, losses, color=color, alpha=0.3, linewidth=1, label=f"{label} train loss (raw)".strip())
            ax_loss.plot(
                steps, smooth(losses), color=color, linewidth=2, label=f"{label} train loss (smoothed)".strip()
            )
        rewarded = [r for r in train if "reward" in r]
        if rewarded and name == "reward":  # GRPO: the sampled completions' reward as training went
            steps, rewards = [r["step"] for r in rewarded], [r["reward"] for r in rewarded]
            ax_metric.plot(steps, rewards, color=color, alpha=0.3, linewidth=1, label=f"{label} train reward".strip())
            ax_metric.plot(
                steps, smooth(rewards), color=color, linewidth=2, label=f"{label} train reward (smoothed)".strip()
            )
        if val and all("loss" in r for r in val):
            steps = [r["step"] for r in val]
            ax_loss.plot(
                steps,
                [r["loss"] for r in val],
                color=color,
                linestyle="--",
                marker="o",
                label=f"{label} validation loss".strip(),
            )
        if val and name is not None:
            ax_metric.plot(
                [r["step"] for r in val],
                [r[name] for r in val],
                color=color,
                marker="o",
                label=f"{label} validation {name}".strip(),
            )
        best = _best_step(run)
        if best is not None:
            for ax in (ax_loss, ax_metric):
                ax.axvline(best, color=color, linestyle=":", linewidth=1.5)
            ax_metric.annotate(
                f"best step {best}",
                xy=(best, 0.02),
                xycoords=("data", "axes fraction"),
                color=color,
                rotation=90,
                va="bottom",
                ha="right",
            )
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_metric.set(xlabel="step", ylabel=title, title=f"validation {title}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(r.name for r in runs))
    return _save(fig, output)


def _best_step(run: Path) -> int | None:
    try:
        return json.loads((run / "summary.json").read_text()).get("best_step")
    except (OSError, json.JSONDecodeError):
        return None


def plot_comparison(rows: list[dict[str, Any]], output: str | Path) -> Path:
    """Accuracy against trainable parameters (log scale), and train time, one point/bar per run.

    Test accuracy is drawn where the runs have a test split, validation accuracy otherwise.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "test" if all(r.get("test_accuracy") is not None for r in rows) else "val"
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        ax_acc.scatter(r["trainable_params"], r[f"{split}_accuracy"], s=40)
        ax_acc.annotate(
            r["run"],
            (r["trainable_params"], r[f"{split}_accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=9,
        )
    ax_acc.set_xscale("log")
    ax_acc.set(
        xlabel="trainable parameters (log scale)",
        ylabel=f"{split} accuracy",
        title=f"{split} accuracy against trainable parameters",
    )
    names = [r["run"] for r in rows]
    ax_time.barh(names, [r["train_seconds"] for r in rows], color="tab:gray")
    ax_time.invert_yaxis()
    ax_time.set(xlabel="train time (s, evaluations included)", title="train time")
    for ax in (ax_acc, ax_time):
        ax.grid(alpha=0.3)
    return _save(fig, output)


def _save(fig: Any, output: str | Path) -> Path:
    """Lay out, write ``output`` atomically, and free the figure."""
    import matplotlib.pyplot as plt

    from .fsio import atomic_path

    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return output
