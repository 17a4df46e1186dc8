"""One readable training loop (on ``accelerate``), from a validated :class:`RunConfig`.

:class:`Trainer` holds a run's state on the object and does one thing per method: ``setup``
loads and checks everything (nothing is written before every input is checked), ``run`` walks
the epochs, ``step`` takes one micro-batch, ``evaluate`` watches validation (best adapter,
overfitting, early stopping), ``save_checkpoint`` writes where the loop stands, and ``finish``
tests the best adapter and writes the summary. The loop's position is one dataclass,
:class:`LoopState`, which checkpoints store as JSON.

Runs unchanged in one process or several (``accelerate launch`` / ``torchrun``; DDP, gloo on
CPU): each process takes its share of every epoch's batches, and process 0 alone writes. The
CPU speed layer (:mod:`peftkit.accel`) is applied from here, around each step, and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from . import accel, sharding
from .checkpoint import find_resume, load_checkpoint, rng_state, save_checkpoint, set_rng_state, stop_for_test
from .config import RunConfig, dump_config
from .data import LengthGroupedBatches, RepeatedWindows
from .errors import Interrupted, PeftkitError
from .fsio import atomic_write_text, write_json
from .methods.base import MethodHooks, count_parameters, injection_of, parameter_report, trainable_state
from .methods.saving import save_adapter
from .monitor import Progress, open_reporters, peak_rss_bytes
from .precision import compute_dtype, resolve_mixed_precision
from .prepare import (
    Prepared,
    build_optimizer,
    check_output_dir,
    check_resume_config,
    clear_run_outputs,
    is_own_unfinished_run,
    prepare,
)
from .tasks import Task

COMPLETIONS = "completions.jsonl"  # a GRPO run's sample completions (Trainer.log_samples)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the base lr over ``warmup`` steps, then linear/cosine decay or flat."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


class MetricsLog:
    """Appends one JSON record per line to ``metrics.jsonl`` (process 0 only).

    On resume the file starts from the history the checkpoint holds, so it equals that of
    a run that was never interrupted. ``text`` is the whole history (for checkpoints).
    """

    def __init__(self, path: Path | None, history: str = "", reporters: list[Any] = ()):
        self.file = None
        self.text = history
        self.reporters = list(reporters)
        if path:
            atomic_write_text(path, history)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run, closed by close()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        self.text += line
        if self.file:
            self.file.write(line)
            self.file.flush()
        for reporter in self.reporters:
            reporter.log(record)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return probe.is_available() if probe is not None else torch.cuda.is_available()


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def improved(new: float, ref: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Whether ``new`` beats ``ref`` by more than ``min_delta`` (lower is better for loss)."""
    if ref is None:
        return True
    return new < ref - min_delta if metric == "loss" else new > ref + min_delta


@dataclass
class LoopState:
    """Where the loop stands: all a checkpoint needs to continue it exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch the next batch belongs to
    next_batch: int = 0  # that batch's index in the epoch's order
    window_loss: float = 0.0  # summed micro-batch losses since the last logged step
    window_n: int = 0
    window_metrics: dict[str, float] = field(default_factory=dict)  # the task's other metrics, summed likewise
    window_counts: dict[str, int] = field(default_factory=dict)
    last_train_loss: float | None = None  # the last logged mean
    best: dict[str, Any] | None = None  # metrics of the best evaluation, with its step and epoch
    history: list[list] = field(default_factory=list)  # [step, validation loss, training loss] per evaluation
    warned_at: int | None = None  # the step overfitting was reported from
    es_best: float | None = None  # early stopping's reference value
    bad_evals: int = 0  # evaluations since early stopping's metric last improved
    early_stopped_at: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        """The state a checkpoint's ``loop.json`` holds (keys it lacks take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def overfitting_since(history: list[list], evals: int = 3) -> int | None:
    """The step where validation loss started rising, if it rose for ``evals`` evaluations
    in a row while the training loss fell over the same stretch."""
    if len(history) <= evals:
        return None
    recent = history[-(evals + 1) :]
    val = [h[1] for h in recent]
    train = [h[2] for h in recent]
    if all(b > a for a, b in zip(val, val[1:])) and None not in train and train[-1] < train[0]:
        return recent[0][0]
    return None


class Trainer:
    """One training run of ``cfg``.

    Args:
        cfg: the validated run config.
        echo: receives every message; None prints them (with a progress bar on a terminal).
    """

    def __init__(self, cfg: RunConfig, echo: Callable[[str], None] | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.out = Path(cfg.output_dir)
        self.state = LoopState()
        self.best_state: dict[str, torch.Tensor] = {}
        self.precision = resolve_mixed_precision(self.tc.mixed_precision)
        # bf16 autocast covers the training steps only (``autocast`` below): evaluation runs in
        # float32, so its metrics are the ones ``peftkit eval`` and ``predict`` reproduce. fp16
        # needs a gradient scaler, which accelerate brings along with its own autocast.
        self.acc = Accelerator(mixed_precision="fp16" if self.precision == "fp16" else "no", cpu=not _has_accelerator())
        self.main = self.acc.is_main_process
        # FSDP2 when asked for and there is more than one process to shard over; the checkpoint's
        # optimizer state is in its (name-keyed, whole-tensor) form whenever the strategy is fsdp
        self.fsdp = self.tc.distributed.strategy == "fsdp"
        self.sharded = self.fsdp and self.acc.num_processes > 1
        self.progress = Progress(enabled=self.main, echo=echo)
        self.trained = self.seen = 0  # examples trained on (in all), and since the last logged step
        self.eval_seconds = 0.0
        self.window_start = 0.0  # when the current logging window began (perf_counter)
        # built by setup(), in this order: what prepare() made, the training components, the outputs
        self.prep: Prepared | None = None
        self.model: nn.Module = nn.Module()
        self.task: Task | None = None
        self.hooks: MethodHooks | None = None  # the method's own training hooks (AdaLoRA's rank budget)
        self.counts: tuple[int, int] = (0, 0)  # trainable and total parameters
        self.best_metric = self.tc.metric_for_best
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self.params: list[torch.nn.Parameter] = []
        self.lrs: list[float] = []  # this run's learning rates per parameter group
        self.sampler: LengthGroupedBatches | None = None
        self.steps_per_epoch = self.total_steps = 1
        self.log: MetricsLog | None = None
        self.ddp_model: nn.Module | None = None
        self.speedups: contextlib.AbstractContextManager = contextlib.nullcontext()

    def say(self, message: str) -> None:
        self.progress.say(message)

    # ---- setup: everything is loaded and checked before anything is written ----
    def setup(self) -> None:
        """Check the output folder, load data, model and method, build the optimizer and schedule,
        restore a checkpoint when resuming, then write the config and open the logs."""
        cfg, out = self.cfg, self.out
        resume_from = find_resume(out, cfg.resume) if cfg.resume and out.is_dir() else None
        restart = False
        if resume_from is None and cfg.resume == "auto" and out.is_dir() and any(out.iterdir()):
            restart = is_own_unfinished_run(out, cfg)
        if resume_from is not None:
            check_resume_config(out, cfg, self.say)
        elif not restart:
            check_output_dir(cfg)
        self.acc.wait_for_everyone()  # every process has checked before process 0 writes anything

        if self.sharded:
            sharding.check(cfg, self.acc.device)
        self.prep = prepare(cfg)
        self.model, self.task = self.prep.model, self.prep.task
        if self.sharded:
            self.model.to(self.acc.device)
            units = sharding.shard(self.model)
            mine, whole = sharding.held_bytes(self.model)
            self.say(
                f"fsdp: {units} units sharded over {self.acc.num_processes} processes; parameters held by each "
                f"process: {mine / 2**20:.4g} of {whole / 2**20:.4g} MiB"
            )
        elif self.fsdp:
            self.say("note: train.distributed.strategy fsdp with one process: nothing to shard, training as usual")
        self.hooks = injection_of(self.model).schedule
        self._report_setup()
        self._build_training()
        self.task.start(self.model, self.acc.device, self._autocast, self.say)
        history = ""
        if resume_from is not None:
            history = self._restore(resume_from)
        elif restart:
            self.say(f"resume=auto: {out} holds this run's outputs but no complete checkpoint; starting from step 0")
        self._open_outputs(fresh=resume_from is None, clear=cfg.overwrite or restart, history=history)

    def _report_setup(self) -> None:
        cfg, tc = self.cfg, self.tc
        self.counts = count_parameters(self.model)
        self.say(f"model {cfg.model}: {parameter_report(self.model)}")
        if self.prep.quantization is not None:
            self.say(self.prep.quantization.line())
        self.say(f"data {cfg.dataset}: {self.task.describe()}")
        n = self.acc.num_processes
        self.say(
            f"processes: {n} ({'data parallel, ' if n > 1 else ''}{self.acc.device.type}); batch_size "
            f"{tc.batch_size} per process x {n} x grad_accum {tc.grad_accum} = {tc.batch_size * n * tc.grad_accum} "
            "examples per optimizer step"
        )
        if n == 1 and os.environ.get("ACCELERATE_USE_CPU") and "WORLD_SIZE" not in os.environ:
            self.say(
                "note: accelerate launch --cpu starts one process whatever --num_processes says; for several "
                "CPU processes use torchrun --standalone --nproc_per_node N -m peftkit train ..."
            )
        if tc.mixed_precision == "auto":
            self.say(
                "mixed precision: bf16 autocast (native bf16 here; train.mixed_precision=no for float32)"
                if self.precision == "bf16"
                else "mixed precision: none, float32 (no native bf16 here)"
            )
        self.best_metric = self.task.best_metric(tc.metric_for_best)
        if self.best_metric != tc.metric_for_best and "metric_for_best" in tc.model_fields_set:
            self.say(
                f"train.metric_for_best {tc.metric_for_best} does not apply to this data: the best adapter "
                f"is chosen by validation {self.best_metric}"
            )

    def _build_training(self) -> None:
        """The optimizer, the learning-rate schedule and the batch sampler."""

        tc, acc = self.tc, self.acc
        self.optimizer = build_optimizer(self.model, tc)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.lrs = [g["lr"] for g in self.optimizer.param_groups]  # this run's, whatever a checkpoint says
        lengths = [len(f["input_ids"]) for f in self.task.features["train"]]
        self.sampler = LengthGroupedBatches(
            lengths,
            tc.batch_size,
            seed=self.cfg.seed,
            group_by_length=tc.group_by_length,
            num_processes=acc.num_processes,
            process_index=acc.process_index,
        )
        if getattr(self.task, "repeats", 1) > 1:  # GRPO: several updates per batch of generations
            self.sampler = RepeatedWindows(self.sampler, tc.grad_accum, self.task.repeats)
        self.steps_per_epoch = max(1, len(self.sampler) // tc.grad_accum)
        self.total_steps = tc.max_steps or max(1, int(self.steps_per_epoch * tc.epochs))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(tc.scheduler, int(tc.warmup_ratio * self.total_steps), self.total_steps)
        )
        budget = getattr(self.cfg.method, "total_step", None)
        if self.hooks is not None and budget is not None and budget != self.total_steps:
            self.say(
                f"note: method.total_step is {budget} but this run takes {self.total_steps} optimizer steps; "
                "the rank budget follows method.total_step"
            )

    def _restore(self, path: Path) -> str:
        """Load the checkpoint at ``path`` into the model, optimizer, LR schedule, RNGs, method
        hooks and loop state; returns the metrics history it holds."""
        ck = load_checkpoint(path)
        self._check_strategy(path)
        self._load_trainable(ck["trainable"])
        self.best_state = ck["best"]
        if self.fsdp:
            sharding.load_optimizer_state(self.model, self.optimizer, ck["optimizer"])
        else:
            self.optimizer.load_state_dict(ck["optimizer"])
        self.lr_schedule.load_state_dict(ck["scheduler"])
        self.lr_schedule.base_lrs = self.lrs  # a changed lr applies from here on
        rngs, n = ck["rngs"], self.acc.num_processes
        if len(rngs) != n:
            self.say(
                f"note: the checkpoint was written by {len(rngs)} processes, this run has {n}: the adapter and "
                "optimizer state continue, the data order and random streams from here on differ"
            )
        set_rng_state(rngs[self.acc.process_index % len(rngs)])
        if ck.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(ck["scaler"])
        if self.hooks is not None:
            self.hooks.load_state_dict(ck.get("method") or {})
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(ck.get("task") or {}, self.acc.device)
        self.state = LoopState.from_json(ck["loop"])
        if self.main and (self.out / COMPLETIONS).is_file():  # samples logged after the checkpoint go
            lines = (self.out / COMPLETIONS).read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [x for x in lines if json.loads(x)["step"] <= self.state.step]
            atomic_write_text(self.out / COMPLETIONS, "".join(kept))
        self.say(f"resuming from {path} (step {self.state.step})")
        return ck["metrics"]

    def _check_strategy(self, path: Path) -> None:
        """A checkpoint's optimizer state is in the form of the strategy that wrote it."""
        import yaml

        old = yaml.safe_load((path / "config.yaml").read_text()) or {}
        wrote = ((old.get("train") or {}).get("distributed") or {}).get("strategy", "ddp")
        if (wrote == "fsdp") != self.fsdp:
            raise PeftkitError(
                f"the checkpoint was written with train.distributed.strategy {wrote}",
                str(path),
                f"resume with train.distributed.strategy={wrote}",
            )

    def _open_outputs(self, fresh: bool, clear: bool, history: str) -> None:
        """Every input is checked: from here on process 0 writes."""
        cfg, out = self.cfg, self.out
        if self.main:
            if fresh and clear and out.exists():
                clear_run_outputs(out)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", dump_config(cfg))
        self.acc.wait_for_everyone()
        reporters = open_reporters(self.tc.report_to, out, cfg.model_dump(mode="json")) if self.main else []
        self.log = MetricsLog(out / "metrics.jsonl" if self.main else None, history=history, reporters=reporters)
        if self.sharded:
            self.ddp_model = self.model  # FSDP2 shards the model in place; the optimizer is used as built
        else:
            self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.speedups = self._speed_layer()

    def _speed_layer(self) -> contextlib.AbstractContextManager:
        """The CPU speed layer (:mod:`peftkit.accel`) to enter around each step, or a null context."""
        if self.sharded:
            self.say("speed layer: off under FSDP (its prepared copies of the frozen weights would be whole)")
            return contextlib.nullcontext()
        if not accel.wanted(self.tc.accel, self.acc.device):
            self.say(f"speed layer: off (train.accel={self.tc.accel} on {self.acc.device.type})")
            return contextlib.nullcontext()
        layer = accel.StepSpeedups(self.model, compute_dtype(self.precision))  # cast and packed once
        self.say(layer.describe())
        if hasattr(self.task, "decoding"):  # GRPO samples with prepared, merged products
            self.task.decoding, self.task.sample_dtype = accel.DecodeProducts, compute_dtype(self.precision)
            self.say(f"sampling: linear layers merged and prepared in {compute_dtype(self.precision)} per generation")
        return layer

    # ---- the loop ----
    def run(self) -> dict[str, Any]:
        """Train, evaluate, checkpoint, and write the run's outputs; returns the summary.

        Outputs under ``cfg.output_dir``: ``adapter/`` (best validation score, PEFT layout),
        ``checkpoints/``, ``metrics.jsonl``, ``summary.json``, ``config.yaml``.

        Raises:
            PeftkitError: bad input, a NaN loss, or an unwritable checkpoint.
            Interrupted: SIGINT/SIGTERM; a checkpoint to resume from was written first.
        """
        self.setup()
        self.model.train()
        self.progress.start(self.total_steps, self.state.step)
        start = self.window_start = time.perf_counter()
        try:
            with StopSignals() as signals:
                epochs = math.ceil(self.total_steps / self.steps_per_epoch)
                for epoch in range(self.state.epoch, epochs):
                    if self.train_epoch(epoch, signals):
                        break
        except BaseException:
            self.progress.close()
            self.log.close()
            raise
        self.progress.close()
        return self.finish(time.perf_counter() - start)

    def train_epoch(self, epoch: int, signals: StopSignals) -> bool:
        """One epoch's batches from where the state stands; True when the run is over."""
        tc, st = self.tc, self.state
        if st.step >= self.total_steps:
            return True
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)
        usable = len(batches) - len(batches) % tc.grad_accum
        first = st.next_batch if epoch == st.epoch else 0
        for i in range(first, usable):
            sync = (i + 1) % tc.grad_accum == 0
            self.step(batches[i], sync)
            if not sync:
                continue
            self.update()
            self.log_samples()
            stop_for_test("step", st.step)
            last, epoch_end = st.step >= self.total_steps, i + tc.grad_accum >= usable
            if st.step % tc.log_steps == 0 or last:
                self.log_train()
            stop = False
            if (tc.eval_steps and st.step % tc.eval_steps == 0) or (epoch_end and not tc.eval_steps) or last:
                stop = self.evaluate_validation()
            if (tc.save_steps and st.step % tc.save_steps == 0) or epoch_end or signals.received or stop:
                self.save_checkpoint(epoch, i + 1)
            if signals.received:
                name = signal.Signals(signals.received).name
                raise Interrupted(
                    f"stopped by {name} at step {st.step}; checkpoint written", StopSignals.CODES[signals.received]
                )
            if last or stop:
                return True
        return False

    def step(self, indices: list[int], sync: bool) -> None:
        """Forward and backward of one micro-batch (gradients synchronised across processes when
        ``sync``), inside the speed layer; refuses a non-finite loss before it reaches the weights."""
        acc = self.acc
        batch = {k: v.to(acc.device) for k, v in self.task.batch(indices).items()}
        if self.sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
            self.model.set_requires_gradient_sync(sync)
        quiet = contextlib.nullcontext() if sync or self.sharded else acc.no_sync(self.ddp_model)
        # the speed layer from the forward through the backward, which uses it too
        with quiet, self.speedups:
            with self._autocast():
                loss = self.task.loss(self.ddp_model, batch)
                total = loss if self.hooks is None else loss + self.hooks.penalty()
            acc.backward(total / self.tc.grad_accum)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise PeftkitError(
                f"training loss became {value} at step {self.state.step + 1}",
                "train",
                "lower train.lr, or check the data; the last checkpoint is intact",
            )
        st = self.state
        st.window_loss += value
        st.window_n += 1
        for key, metric in self.task.last_metrics.items():
            st.window_metrics[key] = st.window_metrics.get(key, 0.0) + metric
            st.window_counts[key] = st.window_counts.get(key, 0) + 1
        examples = self._examples(indices) * acc.num_processes
        self.seen += examples
        self.trained += examples

    def _examples(self, indices: Any) -> int:
        """Training examples in these sequences: a packed one holds several (its segments)."""
        feats = self.task.features["train"]
        return sum(feats[i]["segments"][-1] + 1 if "segments" in feats[i] else 1 for i in indices)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16)

    def update(self) -> None:
        """Clip, step the optimizer and the schedule, and count the step."""
        if self.tc.max_grad_norm and self.sharded:
            sharding.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        elif self.tc.max_grad_norm:
            self.acc.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.state.step += 1
        if self.hooks is not None:  # the method's own step (AdaLoRA's rank allocation) reads the gradients
            self.hooks.after_step(self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step()

    def log_samples(self) -> None:
        """Append the completions the task sampled at this step (GRPO) to ``completions.jsonl``,
        every ``task.sample_every`` steps."""
        every, samples = getattr(self.task, "sample_every", 0), getattr(self.task, "samples", None)
        if self.main and every and samples and self.state.step % every == 0:
            with open(self.out / COMPLETIONS, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": self.state.step, **s}) + "\n" for s in samples)
        if samples:  # each step's own: a rollout used again at the next step is not logged again
            samples.clear()

    def log_train(self) -> None:
        """The mean training loss since the last logged step, the lr and the speed."""
        st, acc = self.state, self.acc
        names = sorted(st.window_metrics)
        local = [st.window_loss / st.window_n] + [st.window_metrics[k] / st.window_counts[k] for k in names]
        means = acc.reduce(torch.tensor(local, device=acc.device), "mean").tolist()
        mean, others = means[0], dict(zip(names, means[1:]))
        window = max(1e-9, time.perf_counter() - self.window_start)
        rate = self.seen / window
        lr = self.lr_schedule.get_last_lr()[0]
        epoch = st.step / self.steps_per_epoch
        self.log.write(
            {
                "type": "train",
                "step": st.step,
                "epoch": round(epoch, 4),
                "loss": mean,
                **others,
                "lr": lr,
                "examples_per_s": rate,
                "step_seconds": window / max(1, st.window_n // self.tc.grad_accum),
            }
        )
        self.progress.show(mean, lr, rate)
        wanted = getattr(self.task, "shown", ("rewards/accuracies", "rewards/margins"))
        shown = "".join(f" {k} {v:.4f}" for k, v in others.items() if k in wanted)
        self.progress.say(
            f"step {st.step}/{self.total_steps} epoch {epoch:.2f} loss {mean:.4f}{shown} lr {lr:.2e} "
            f"{rate:.0f} examples/s",
            line_only=True,
        )
        st.last_train_loss = mean
        st.window_loss, st.window_n, self.seen, self.window_start = 0.0, 0, 0, time.perf_counter()
        st.window_metrics, st.window_counts = {}, {}

    # ---- evaluation ----
    def evaluate(self, split: str, final: bool = False) -> dict[str, Any]:
        acc = self.acc
        # under FSDP every process runs every batch: each forward gathers with all of them
        processes, index = (1, 0) if self.sharded else (acc.num_processes, acc.process_index)
        return self.task.evaluate(
            self.ddp_model, split, self.tc.eval_batch_size, acc.device, processes, index, final=final
        )

    def evaluate_validation(self) -> bool:
        """Evaluate, keep the best adapter, watch for overfitting; True when early stopping fires."""
        st = self.state
        epoch = st.step / self.steps_per_epoch
        began = time.perf_counter()
        metrics = self.evaluate("validation")
        self.eval_seconds += time.perf_counter() - began
        self.log.write(
            {
                "type": "eval",
                "split": "validation",
                "step": st.step,
                "epoch": round(epoch, 4),
                **{k: v for k, v in metrics.items() if k != "confusion_matrix"},
            }
        )
        metric = self.best_metric
        is_best = improved(metrics[metric], st.best and st.best[metric], metric)
        self.say(f"eval step {st.step} epoch {epoch:.2f}: {self.task.line(metrics)}" + (" (best)" if is_best else ""))
        if is_best:
            self.keep_best(metrics, epoch)
        if "loss" in metrics:  # a GRPO evaluation has rewards, no loss
            st.history.append([st.step, metrics["loss"], st.last_train_loss])
        rising = overfitting_since(st.history)
        if rising is not None and st.warned_at is None:
            st.warned_at = rising
            self.say(
                f"warning: validation loss has risen since step {rising} while training loss kept falling "
                "(overfitting); the adapter of the best evaluation is kept"
            )
        return self.early_stop(metrics)

    def keep_best(self, metrics: dict[str, Any], epoch: float) -> None:
        """Remember the trainable tensors of a new best evaluation and write them as ``adapter/``."""
        self.state.best = {**metrics, "step": self.state.step, "epoch": round(epoch, 4)}
        self.best_state = self._trainable()
        whole = sharding.full_adapter_state(self.model) if self.sharded else None  # every process gathers
        if self.main:  # one ordinary adapter folder
            save_adapter(
                self.model,
                self.out / "adapter",
                base_model=self.cfg.model,
                task=self.task.name,
                meta=self.task.meta,
                state=whole,
            )

    def _trainable(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors, whole (gathered from the shards under FSDP)."""
        if self.sharded:
            return sharding.full_trainable(self.model)
        return {k: v.detach().clone() for k, v in trainable_state(self.model).items()}

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            sharding.load_trainable(self.model, state)
            return
        with torch.no_grad():
            for k, v in trainable_state(self.model).items():
                v.copy_(state[k])

    def early_stop(self, metrics: dict[str, Any]) -> bool:
        es, st = self.tc.early_stopping, self.state
        if es is None:
            return False
        metric = self.task.best_metric(es.metric)
        if improved(metrics[metric], st.es_best, metric, es.min_delta):
            st.es_best, st.bad_evals = metrics[metric], 0
            return False
        st.bad_evals += 1
        if st.bad_evals < es.patience:
            return False
        self.say(f"early stopping at step {st.step}: no {metric} improvement in {es.patience} evaluations")
        st.early_stopped_at = st.step
        return True

    # ---- checkpoints and the end of the run ----
    def save_checkpoint(self, epoch: int, next_batch: int) -> None:
        from accelerate.utils import gather_object

        acc, st = self.acc, self.state
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        st.epoch, st.next_batch = epoch, next_batch
        optimizer: Any = self.optimizer
        if self.fsdp:  # whole tensors keyed by name: any process count can restore them
            optimizer = sharding.FullState(sharding.full_optimizer_state(self.model, self.optimizer))
        trainable = self._trainable() if self.sharded else trainable_state(self.model)
        if self.main:
            save_checkpoint(
                self.out,
                st.step,
                trainable=trainable,
                best=self.best_state,
                optimizer=optimizer,
                scheduler=self.lr_schedule,
                scaler=acc.scaler,
                rngs=rngs,
                method=self.hooks.state_dict() if self.hooks is not None else None,
                task=self.task.state_dict() if hasattr(self.task, "state_dict") else None,
                loop=dataclasses.asdict(st),
                metrics=self.log.text,
                config=dump_config(self.cfg),
                keep=self.tc.save_total_limit,
                best_step=st.best and st.best["step"],
            )
        acc.wait_for_everyone()

    def finish(self, train_seconds: float) -> dict[str, Any]:
        """Test the best adapter (what ``adapter/`` holds) and write ``summary.json`` and the curves."""
        st = self.state
        self.speedups = None  # its prepared weights are not needed any more
        self._load_trainable(self.best_state)
        summary = self.summary(train_seconds, peak_rss_bytes())
        if "test" in self.task.features:
            began = time.perf_counter()
            summary["test"] = self.evaluate("test", final=True)
            summary["test_seconds"] = round(time.perf_counter() - began, 2)
            self.log.write(
                {
                    "type": "eval",
                    "split": "test",
                    "step": st.step,
                    **{k: v for k, v in summary["test"].items() if k != "confusion_matrix"},
                }
            )
        self.log.close()
        if self.main:
            from .plot import plot_runs  # matplotlib loads only when a run draws its curves

            write_json(self.out / "summary.json", summary)
            plot_runs([self.out], self.out / "curves.png")
        self.acc.wait_for_everyone()
        return summary

    def summary(self, train_seconds: float, peak_rss: int) -> dict[str, Any]:
        st, (trainable, total) = self.state, self.counts
        quantization = self.prep.quantization
        return {
            "validation": dict(st.best),
            "best_step": st.best["step"],
            "steps": st.step,
            "early_stopped_at": st.early_stopped_at,
            "overfitting_since": st.warned_at,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total,
            "mixed_precision": self.precision,
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2),
            "examples_per_s": round(self.trained / max(1e-9, train_seconds - self.eval_seconds), 2),
            "peak_rss_bytes": peak_rss,
            "quantization": quantization.as_dict() if quantization is not None else None,
            "train_examples": self._examples(range(len(self.task.features["train"]))),
            "train_sequences": len(self.task.features["train"]),  # fewer than the examples when packed
            **self.task.summary(),
            "adapter": str(self.out / "adapter"),
        }


def train(cfg: RunConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run :class:`Trainer` on ``cfg``; returns the summary (see :meth:`Trainer.run`)."""
    return Trainer(cfg, echo).run()
