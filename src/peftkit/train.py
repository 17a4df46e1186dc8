"""One readable training loop (on ``accelerate``), from a validated :class:`RunConfig`.

Runs unchanged in one process or several (``accelerate launch`` / ``torchrun``; DDP, gloo on
CPU): each process takes its share of every epoch's batches, and process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig, dump_config
from .errors import Interrupted, PeftkitError
from .frozen import FrozenLinears
from .fsio import atomic_write_text, write_json
from .precision import compute_dtype, resolve_mixed_precision
from .prepare import build_optimizer, check_output_dir, check_resume_config, clear_run_outputs, prepare


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
            self.file = open(path, "a", encoding="utf-8")

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

    def __enter__(self) -> "StopSignals":
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


def train(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, checkpoint, and write the run's outputs; returns the summary.

    Outputs under ``cfg.output_dir``: ``adapter/`` (best validation score, PEFT layout),
    ``checkpoints/``, ``metrics.jsonl``, ``summary.json``, ``config.yaml``.

    Raises:
        PeftkitError: bad input, a NaN loss, or an unwritable checkpoint.
        Interrupted: SIGINT/SIGTERM; a checkpoint to resume from was written first.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from .adapter_io import save_adapter
    from .checkpoint import find_resume, load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from .data import LengthGroupedBatches
    from .methods import count_parameters, parameter_report, trainable_state

    # accelerate only runs several CPU processes (DDP over gloo) when told it is on the CPU
    tc = cfg.train
    precision = resolve_mixed_precision(tc.mixed_precision)
    # bf16 autocast covers the training steps only (``autocast`` below): evaluation runs in
    # float32, so its metrics are the ones ``peftkit eval`` and ``predict`` reproduce. fp16
    # needs a gradient scaler, which accelerate brings along with its own autocast.
    acc = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no", cpu=not _has_accelerator())
    main = acc.is_main_process
    say = echo if main else (lambda _msg: None)
    out = Path(cfg.output_dir)
    resume_from = find_resume(out, cfg.resume) if cfg.resume and out.is_dir() else None
    if resume_from is None:
        check_output_dir(cfg)
    else:
        check_resume_config(out, cfg, say)
    acc.wait_for_everyone()  # every process has checked before process 0 writes anything

    prep = prepare(cfg)
    model, task = prep.model, prep.task
    trainable, total = count_parameters(model)
    say(f"model {cfg.model}: {parameter_report(model)}")
    if prep.quantization is not None:
        say(prep.quantization.line())
    say(f"data {cfg.dataset}: {task.describe()}")
    if tc.mixed_precision == "auto":
        say("mixed precision: bf16 autocast (native bf16 here; train.mixed_precision=no for float32)"
            if precision == "bf16" else "mixed precision: none, float32 (no native bf16 here)")
    best_metric = task.best_metric(tc.metric_for_best)
    if best_metric != tc.metric_for_best:
        say(f"train.metric_for_best {tc.metric_for_best} does not apply to this data: the best adapter is "
            f"chosen by validation {best_metric}")

    optimizer = build_optimizer(model, tc)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]  # this run's, whatever a checkpoint says
    train_feats = task.features["train"]
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in train_feats], tc.batch_size, seed=cfg.seed,
                                   group_by_length=tc.group_by_length, num_processes=acc.num_processes,
                                   process_index=acc.process_index)
    steps_per_epoch = max(1, len(sampler) // tc.grad_accum)
    total_steps = tc.max_steps or max(1, int(steps_per_epoch * tc.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.scheduler, int(tc.warmup_ratio * total_steps), total_steps))

    # the loop's whole position; a checkpoint stores it and a resume restores it
    loop: dict[str, Any] = {"step": 0, "epoch": 0, "next_batch": 0, "window_loss": 0.0, "window_n": 0,
                            "best": None, "bad_evals": 0, "history": [], "warned_at": None}
    best_state: dict[str, torch.Tensor] = {}
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        with torch.no_grad():
            for k, v in trainable_state(model).items():
                v.copy_(ck["trainable"][k])
        best_state = ck["best"]
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scheduler.base_lrs = lrs  # a changed lr applies from here on
        set_rng_state(ck["rngs"][acc.process_index])
        if ck.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(ck["scaler"])
        loop = ck["loop"]
        say(f"resuming from {resume_from} (step {loop['step']})")

    if main:  # every input is checked: from here on we write
        if resume_from is None:
            if out.exists() and cfg.overwrite:
                clear_run_outputs(out)
            out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    acc.wait_for_everyone()
    from .monitor import Progress, open_reporters

    reporters = open_reporters(tc.report_to, out, cfg.model_dump(mode="json")) if main else []
    log = MetricsLog(out / "metrics.jsonl" if main else None, history=ck["metrics"] if resume_from else "",
                     reporters=reporters)
    ddp_model, optimizer = acc.prepare(model, optimizer)

    def evaluate(split: str, final: bool = False) -> dict[str, Any]:
        return task.evaluate(ddp_model, split, tc.eval_batch_size, acc.device, acc.num_processes,
                             acc.process_index, final=final)

    def run_eval(step: int, epoch: float, train_loss: float | None) -> bool:
        """Evaluate, keep the best adapter, watch for overfitting; True when early stopping fires."""
        nonlocal best_state, eval_seconds
        began = time.perf_counter()
        metrics = evaluate("validation")
        eval_seconds += time.perf_counter() - began
        log.write({"type": "eval", "split": "validation", "step": step, "epoch": round(epoch, 4),
                   **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})
        best = loop["best"]
        is_best = improved(metrics[best_metric], best and best[best_metric], best_metric)
        say(f"eval step {step} epoch {epoch:.2f}: {task.line(metrics)}" + (" (best)" if is_best else ""))
        if is_best:
            loop["best"] = {**metrics, "step": step, "epoch": round(epoch, 4)}
            best_state = {k: v.detach().clone() for k, v in trainable_state(model).items()}
            if main:
                save_adapter(model, out / "adapter", base_model=cfg.model, task=task.name, meta=task.meta)
        history = loop["history"]
        history.append([step, metrics["loss"], train_loss])
        rising = _overfitting_since(history)
        if rising is not None and loop["warned_at"] is None:
            loop["warned_at"] = rising
            say(f"warning: validation loss has risen since step {rising} while training loss kept falling "
                "(overfitting); the adapter of the best evaluation is kept")
        es = tc.early_stopping
        if es is None:
            return False
        ref = loop.get("es_best")
        es_metric = task.best_metric(es.metric)
        if improved(metrics[es_metric], ref, es_metric, es.min_delta):
            loop["es_best"], loop["bad_evals"] = metrics[es_metric], 0
            return False
        loop["bad_evals"] += 1
        if loop["bad_evals"] >= es.patience:
            say(f"early stopping at step {step}: no {es_metric} improvement in {es.patience} evaluations")
            loop["early_stopped_at"] = step
            return True
        return False

    def checkpoint(epoch: int, next_batch: int) -> None:
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        loop.update(epoch=epoch, next_batch=next_batch)
        if main:
            best = loop["best"]
            save_checkpoint(out, loop["step"], trainable=trainable_state(model), best=best_state,
                            optimizer=optimizer, scheduler=scheduler, scaler=acc.scaler, rngs=rngs, loop=loop,
                            metrics=log.text, config=dump_config(cfg), keep=tc.save_total_limit,
                            best_step=best and best["step"])
        acc.wait_for_everyone()

    def autocast() -> contextlib.AbstractContextManager:
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(acc.device.type, dtype=torch.bfloat16)

    frozen = FrozenLinears(model, compute_dtype(precision))  # cast and packed once, not at every step
    say(frozen.describe())

    model.train()
    seen, window_start = 0, time.perf_counter()
    trained, eval_seconds = 0, 0.0  # examples this process trained on, and the time evaluations took
    start = time.perf_counter()
    epochs = math.ceil(total_steps / steps_per_epoch)
    stop = False
    progress = Progress(total_steps, loop["step"], enabled=main and echo is print)
    if echo is print:
        say = progress.say
    try:
        with StopSignals() as signals:
            for epoch in range(loop["epoch"], epochs):
                if stop or loop["step"] >= total_steps:
                    break
                sampler.set_epoch(epoch)
                batches = list(sampler)
                usable = len(batches) - len(batches) % tc.grad_accum
                first = loop["next_batch"] if epoch == loop["epoch"] else 0
                for i in range(first, usable):
                    idx = batches[i]
                    batch = task.batch(idx)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    sync = (i + 1) % tc.grad_accum == 0
                    with contextlib.nullcontext() if sync else acc.no_sync(ddp_model):
                        with frozen:  # from the forward through the backward, which multiplies with them too
                            with autocast():
                                loss = task.loss(ddp_model, batch)
                            acc.backward(loss / tc.grad_accum)
                    value = loss.detach().float().item()
                    if not math.isfinite(value):  # stop before a bad update reaches the weights
                        raise PeftkitError(f"training loss became {value} at step {loop['step'] + 1}", "train",
                                           "lower train.lr, or check the data; the last checkpoint is intact")
                    loop["window_loss"] += value
                    loop["window_n"] += 1
                    seen += len(idx) * acc.num_processes
                    trained += len(idx) * acc.num_processes
                    if not sync:
                        continue
                    if tc.max_grad_norm:
                        acc.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loop["step"] = step = loop["step"] + 1
                    progress.step()
                    ep = step / steps_per_epoch
                    last, epoch_end = step >= total_steps, i + tc.grad_accum >= usable
                    if step % tc.log_steps == 0 or last:
                        mean = acc.reduce(torch.tensor(loop["window_loss"] / loop["window_n"], device=acc.device),
                                          "mean").item()
                        rate = seen / max(1e-9, time.perf_counter() - window_start)
                        lr = scheduler.get_last_lr()[0]
                        log.write({"type": "train", "step": step, "epoch": round(ep, 4), "loss": mean, "lr": lr,
                                   "examples_per_s": rate})
                        progress.show(mean, lr, rate)
                        if echo is print:
                            progress.say(f"step {step}/{total_steps} epoch {ep:.2f} loss {mean:.4f} lr {lr:.2e} "
                                         f"{rate:.0f} examples/s", line_only=True)
                        else:
                            say(f"step {step}/{total_steps} epoch {ep:.2f} loss {mean:.4f}")
                        loop["last_train_loss"] = mean
                        loop["window_loss"], loop["window_n"], seen, window_start = 0.0, 0, 0, time.perf_counter()
                    if (tc.eval_steps and step % tc.eval_steps == 0) or (epoch_end and not tc.eval_steps) or last:
                        stop = run_eval(step, ep, loop.get("last_train_loss")) or stop
                    if (tc.save_steps and step % tc.save_steps == 0) or epoch_end or signals.received or stop:
                        checkpoint(epoch, i + 1)
                    if signals.received:
                        code = StopSignals.CODES[signals.received]
                        name = signal.Signals(signals.received).name
                        raise Interrupted(f"stopped by {name} at step {step}; checkpoint written", code)
                    if last or stop:
                        break
    except BaseException:
        progress.close()
        log.close()
        raise
    progress.close()
    del frozen  # evaluation multiplies with the layers' own weights
    train_seconds = time.perf_counter() - start
    best = loop["best"]
    with torch.no_grad():  # test with the best adapter, which is also what adapter/ holds
        for k, v in trainable_state(model).items():
            v.copy_(best_state[k])
    summary: dict[str, Any] = {
        "validation": dict(best),
        "best_step": best["step"],
        "steps": loop["step"],
        "early_stopped_at": loop.get("early_stopped_at"),
        "overfitting_since": loop["warned_at"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "mixed_precision": precision,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "examples_per_s": round(trained / max(1e-9, train_seconds - eval_seconds), 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "quantization": prep.quantization.as_dict() if prep.quantization is not None else None,
        "train_examples": len(train_feats),
        **task.summary(),
        "adapter": str(out / "adapter"),
    }
    if "test" in task.features:
        began = time.perf_counter()
        summary["test"] = evaluate("test", final=True)
        summary["test_seconds"] = round(time.perf_counter() - began, 2)
        log.write({"type": "eval", "split": "test", "step": loop["step"],
                   **{k: v for k, v in summary["test"].items() if k != "confusion_matrix"}})
    log.close()
    if main:
        write_json(out / "summary.json", summary)
        from .plot import plot_runs

        plot_runs([out], out / "curves.png")
    acc.wait_for_everyone()
    return summary


def peak_rss_bytes() -> int:
    """The highest resident memory this process has had (Linux reports it in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _overfitting_since(history: list[list], evals: int = 3) -> int | None:
    """The step where validation loss started rising, if it rose for ``evals`` evaluations
    in a row while the training loss fell over the same stretch."""
    if len(history) <= evals:
        return None
    recent = history[-(evals + 1):]
    val = [h[1] for h in recent]
    train = [h[2] for h in recent]
    if all(b > a for a, b in zip(val, val[1:])) and None not in train and train[-1] < train[0]:
        return recent[0][0]
    return None
