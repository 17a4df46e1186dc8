"""Watching a run: progress on the terminal, and metrics sent to TensorBoard, wandb or MLflow.

Every record the loop logs goes to ``metrics.jsonl`` (always) and to each reporter named in
``train.report_to``, through the libraries themselves. wandb runs offline unless the user
has configured it (``WANDB_MODE`` or an API key), so a machine without network never waits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import PeftkitError

SCALARS = ("loss", "lr", "examples_per_s", "accuracy", "f1", "reward", "reward_std", "completion_length", "kl")


def _require(module: str, package: str) -> Any:
    """Import a reporter's library, or say which package ``train.report_to: [package]`` needs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PeftkitError(
            f"report_to {package} needs the {package} package", "train.report_to", f"pip install {package}"
        ) from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    group = record.get("split", "train")
    return {f"{group}/{k}": float(record[k]) for k in SCALARS if record.get(k) is not None}


class TensorBoardReporter:
    def __init__(self, out: Path, config: dict[str, Any]):
        tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, out: Path, config: dict[str, Any]):
        wandb = _require("wandb", "wandb")
        configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "peftkit"),
            dir=str(out),
            config=config,
            name=out.name,
            mode=None if configured else "offline",
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    def __init__(self, out: Path, config: dict[str, Any]):
        mlflow = _require("mlflow", "mlflow")
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())  # local files, no server
        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in _scalars(record).items()}, step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


REPORTERS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def open_reporters(names: list[str], out: Path, config: dict[str, Any]) -> list[Any]:
    return [REPORTERS[name](out, config) for name in names]


def peak_rss_bytes() -> int:
    """The highest resident memory this process has had, in bytes, on any platform.

    ``resource`` reports it in KiB on Linux and in bytes on macOS; where there is no
    ``resource`` module (Windows) psutil gives the peak working set (or the current resident
    size where it has no peak); 0 when neither is available.
    """
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    try:
        import psutil
    except ImportError:
        return 0
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)


class Progress:
    """Where a run's messages go: a progress bar and printed lines on a terminal, plain printed
    lines elsewhere, or a caller's ``echo`` function (and no bar).

    Args:
        enabled: False on processes other than 0 (they say nothing).
        echo: receives every message instead of the terminal; None for the terminal.
    """

    def __init__(self, enabled: bool = True, echo: Any = None):
        self.enabled, self.echo = enabled, echo
        self.bar = None

    def start(self, total: int, initial: int = 0) -> None:
        """Open the bar (on a terminal) for ``total`` optimizer steps, ``initial`` of them done."""
        if self.enabled and self.echo is None and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, loss: float, lr: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.0f}")

    def say(self, message: str, *, line_only: bool = False) -> None:
        """Show a message; ``line_only`` messages are the plain-line progress (hidden under a bar)."""
        if not self.enabled:
            return
        if self.echo is not None:
            self.echo(message)
        elif self.bar is None:
            print(message, flush=True)
        elif not line_only:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
