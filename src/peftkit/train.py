"""One readable training loop (on ``accelerate``), from a validated :class:`RunConfig`.

Runs unchanged in one process or several (``accelerate launch`` / ``torchrun``; DDP, gloo on
CPU): each process takes its share of every epoch's batches, and process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig, dump_config
from .errors import PeftkitError
from .fsio import atomic_write_text, write_json


@dataclass
class Prepared:
    """Everything loaded and checked before the first write to ``output_dir``."""

    model: Any
    tokenizer: Any
    label_names: list[str]
    features: dict[str, list[dict[str, list[int]]]]
    labels: dict[str, list[int]]


RUN_OUTPUTS = ("adapter", "metrics.jsonl", "summary.json", "config.yaml")


def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse a non-empty ``output_dir`` unless ``overwrite`` is set (nothing is lost)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PeftkitError("output_dir is a file", str(out), "choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise PeftkitError("output_dir exists and is not empty", str(out),
                           "choose another output_dir=..., or pass overwrite=true to replace it")
    return out


def clear_run_outputs(out: Path) -> None:
    """Remove a previous run's outputs (and only those: other files in the folder stay)."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare(cfg: RunConfig) -> Prepared:
    """Load and check data, model and method; raises :class:`PeftkitError` on bad input."""
    from accelerate.utils import set_seed

    from .data import encode_labels, infer_label_names, load_splits, tokenize
    from .methods import apply_method, default_modules_to_save
    from .models import load_classifier

    splits = load_splits(cfg.dataset, cfg.data, cfg.seed)
    names = infer_label_names(splits["train"], cfg.data.label_names)
    labels = {s: encode_labels(sp, names, f"{cfg.dataset}, {s} split") for s, sp in splits.items()}
    set_seed(cfg.seed)  # the new head's initialisation is part of the run
    base = load_classifier(cfg.model, names)
    keep = cfg.method.modules_to_save
    if keep is None:
        keep = default_modules_to_save(base.model, base.newly_initialized)
    apply_method(base.model, cfg.method, keep)
    features = {s: tokenize(base.tokenizer, sp.texts, cfg.data.max_length, sp.pairs) for s, sp in splits.items()}
    return Prepared(base.model, base.tokenizer, names, features, labels)


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
    """Appends one JSON record per line to ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def train(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, and write the run's outputs; returns the summary.

    Outputs under ``cfg.output_dir``: ``adapter/`` (best validation score, PEFT layout),
    ``metrics.jsonl``, ``summary.json``, ``config.yaml``.
    """
    from accelerate import Accelerator

    from .adapter_io import save_adapter
    from .data import LengthGroupedBatches, collate
    from .evaluate import classification_metrics, predict_probs
    from .methods import adapter_state_dict, count_parameters, parameter_report, trainable_parameters

    # accelerate only runs several CPU processes (DDP over gloo) when told it is on the CPU
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not _has_accelerator())
    out = check_output_dir(cfg)
    acc.wait_for_everyone()  # every process has checked before process 0 writes anything
    main = acc.is_main_process
    say = echo if main else (lambda _msg: None)
    tc = cfg.train

    prep = prepare(cfg)
    model, tok = prep.model, prep.tokenizer
    trainable, total = count_parameters(model)
    say(f"model {cfg.model}: {parameter_report(model)}")
    say(f"data {cfg.dataset}: " + ", ".join(f"{s} {len(f)}" for s, f in prep.features.items())
        + f"; labels {prep.label_names}")

    if main:  # every input is checked: from here on we write
        if out.exists() and cfg.overwrite:
            clear_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    acc.wait_for_everyone()
    log = MetricsLog(out / "metrics.jsonl" if main else None)

    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    train_feats, train_labels = prep.features["train"], prep.labels["train"]
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in train_feats], tc.batch_size, seed=cfg.seed,
                                   group_by_length=tc.group_by_length, num_processes=acc.num_processes,
                                   process_index=acc.process_index)
    steps_per_epoch = max(1, len(sampler) // tc.grad_accum)
    total_steps = tc.max_steps or max(1, int(steps_per_epoch * tc.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.scheduler, int(tc.warmup_ratio * total_steps), total_steps))
    ddp_model, optimizer = acc.prepare(model, optimizer)
    pad_id = tok.pad_token_id

    def evaluate(split: str) -> dict[str, Any]:
        probs, loss = predict_probs(ddp_model, prep.features[split], pad_id=pad_id, batch_size=tc.eval_batch_size,
                                    labels=prep.labels[split], device=acc.device,
                                    num_processes=acc.num_processes, process_index=acc.process_index)
        return classification_metrics(prep.labels[split], probs, prep.label_names, loss)

    def better(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
        key = tc.metric_for_best
        return old is None or (new[key] < old[key] if key == "loss" else new[key] > old[key])

    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] = {}
    meta = {"id2label": dict(enumerate(prep.label_names)), "max_length": cfg.data.max_length,
            "text_column": cfg.data.text_column, "label_column": cfg.data.label_column,
            "text_pair_column": cfg.data.text_pair_column}

    def run_eval(step: int, epoch: float) -> None:
        nonlocal best, best_state
        metrics = evaluate("validation")
        log.write({"type": "eval", "split": "validation", "step": step, "epoch": round(epoch, 4),
                   **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})
        improved = better(metrics, best)
        say(f"eval step {step} epoch {epoch:.2f}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
            f"f1 {metrics['f1']:.4f}" + (" (best)" if improved else ""))
        if improved:
            best = {**metrics, "step": step, "epoch": round(epoch, 4)}
            best_state = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
            if main:
                save_adapter(model, out / "adapter", base_model=cfg.model, meta=meta)

    model.train()
    step, seen, window_loss, window_n = 0, 0, 0.0, 0
    start = window_start = time.perf_counter()
    epochs = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        usable = len(batches) - len(batches) % tc.grad_accum
        for i, idx in enumerate(batches[:usable]):
            batch = collate([train_feats[j] for j in idx], pad_id, [train_labels[j] for j in idx])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = (i + 1) % tc.grad_accum == 0
            with contextlib.nullcontext() if sync else acc.no_sync(ddp_model):
                loss = ddp_model(**batch).loss
                acc.backward(loss / tc.grad_accum)
            value = loss.detach().float().item()
            if not math.isfinite(value):  # stop before a bad update reaches the weights
                raise PeftkitError(f"training loss became {value} at step {step + 1}", "train",
                                   "lower train.lr, or check the data for empty or broken examples")
            window_loss += value
            window_n += 1
            seen += len(idx) * acc.num_processes
            if not sync:
                continue
            if tc.max_grad_norm:
                acc.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ep = step / steps_per_epoch
            if step % tc.log_steps == 0 or step == total_steps:
                mean = acc.reduce(torch.tensor(window_loss / window_n, device=acc.device), "mean").item()
                rate = seen / max(1e-9, time.perf_counter() - window_start)
                log.write({"type": "train", "step": step, "epoch": round(ep, 4), "loss": mean,
                           "lr": scheduler.get_last_lr()[0], "examples_per_s": rate})
                say(f"step {step}/{total_steps} epoch {ep:.2f} loss {mean:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{rate:.0f} examples/s")
                window_loss, window_n, seen, window_start = 0.0, 0, 0, time.perf_counter()
            if tc.eval_steps and step % tc.eval_steps == 0 and step != total_steps:
                run_eval(step, ep)
            if step >= total_steps:
                break
        if step >= total_steps or not tc.eval_steps:
            run_eval(step, step / steps_per_epoch)
        if step >= total_steps:
            break
    train_seconds = time.perf_counter() - start

    with torch.no_grad():  # test with the best adapter, which is also what adapter/ holds
        for k, v in adapter_state_dict(model).items():
            v.copy_(best_state[k])
    summary: dict[str, Any] = {
        "validation": dict(best),
        "best_step": best["step"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": round(train_seconds, 2),
        "train_examples": len(train_feats),
        "label_names": prep.label_names,
        "adapter": str(out / "adapter"),
    }
    if "test" in prep.features:
        summary["test"] = evaluate("test")
        log.write({"type": "eval", "split": "test", "step": step,
                   **{k: v for k, v in summary["test"].items() if k != "confusion_matrix"}})
    log.close()
    if main:
        write_json(out / "summary.json", summary)
    acc.wait_for_everyone()
    return summary
