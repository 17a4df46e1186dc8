"""``peftkit plan``: what a training run will hold in memory, per process, before a weight is loaded.

The recipe's model is built on the meta device (shapes, no data) with its method attached, which
gives the exact parameter counts. Memory per process is then the sum of:

- **runtime**: this process's resident memory once torch, transformers and peftkit are imported
  (measured here: every training process pays it);
- **base weights**: the frozen parameters in float32, or at the quantized size of the layers the
  recipe quantizes (int8: 1 byte and a row scale; 4-bit: half a byte and a block scale per 64);
  over N processes under FSDP;
- **speed layer**: on CPU, the frozen linear weights prepared twice (forward and transposed) in the
  step's compute dtype (:mod:`peftkit.accel`);
- **trainable weights, gradients, optimizer state**: 4, 4 and 8 bytes a trainable parameter (2 for
  8-bit AdamW's states); over N processes under FSDP;
- **activations**: what autograd saves for backward, counted by running the model's forward on the
  meta device at the recipe's batch and length through ``saved_tensors_hooks`` (bfloat16 where the
  run autocasts), plus the chunked loss's buffers; with gradient checkpointing, each block's input
  and one block's activations.

``--measure`` runs a few real steps and reports the run's peak resident memory beside the estimate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .errors import PeftkitError

MiB = 2**20


@dataclass
class Estimate:
    """A run's parameter counts and its memory per process, part by part (bytes)."""

    total: int
    trainable: int
    processes: int
    strategy: str
    parts: dict[str, int] = field(default_factory=dict)
    activations_checkpointed: int = 0
    available: int = 0  # bytes the device has for one process
    where: str = "CPU RAM"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.available

    def lines(self) -> list[str]:
        width = max(len(k) for k in self.parts)
        out = [
            f"parameters: {self.total:,} total, {self.trainable:,} trainable ({100 * self.trainable / self.total:.2f}%)",
            f"per process ({self.processes} x {self.strategy}):",
        ]
        out += [f"  {k:<{width}} {v / MiB:>10,.0f} MiB" for k, v in self.parts.items()]
        out.append(f"  {'peak':<{width}} {self.peak / MiB:>10,.0f} MiB")
        act = self.parts.get("activations", 0)
        out.append(
            f"  activations with gradient checkpointing: {self.activations_checkpointed / MiB:,.0f} MiB "
            f"(without: {act / MiB:,.0f} MiB)"
            if act
            else ""
        )
        out = [line for line in out if line]
        verdict = "fits" if self.fits else "does not fit"
        out.append(f"{verdict}: {self.peak / MiB:,.0f} of {self.available / MiB:,.0f} MiB {self.where} per process")
        if not self.fits:
            out.append("try: " + "; ".join(self.advice()))
        return out + [f"note: {n}" for n in self.notes]

    def advice(self) -> list[str]:
        tips = []
        if self.parts.get("activations", 0) > self.activations_checkpointed:
            tips.append(
                f"train.gradient_checkpointing=true (activations {self.parts['activations'] / MiB:,.0f} -> "
                f"{self.activations_checkpointed / MiB:,.0f} MiB)"
            )
        tips.append("a smaller train.batch_size with train.grad_accum (same global batch)")
        if self.parts.get("base weights", 0) > self.peak / 4:
            tips.append("quantization.bits=4 (the frozen base at about 1/7 of its float32 size)")
            tips.append("train.distributed.strategy=fsdp over more processes (the base split between them)")
        return tips


def runtime_bytes() -> int:
    """This process's resident memory now (Linux), else 0."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: str) -> tuple[int, str]:
    """Memory one process may use: each GPU's, else the machine's RAM (MemTotal)."""
    if device == "cuda" and torch.cuda.is_available():
        return min(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count())), "GPU memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "CPU RAM"
    except OSError:
        pass
    return 0, "CPU RAM"


def longest_example(cfg: RunConfig) -> tuple[int, int]:
    """The training split's longest tokenized example (at most ``data.max_length``) and the
    number of labels, through the same data stage as ``train`` (no model weights are read)."""
    from .models import load_tokenizer
    from .prepare import load_data
    from .tasks import build_task

    splits, names = load_data(cfg)
    task = build_task(cfg, load_tokenizer(cfg.model), splits, names)
    longest = max((len(f["input_ids"]) for f in task.features["train"]), default=cfg.data.max_length)
    return min(longest, cfg.data.max_length), len(names or [])


def meta_model(cfg: RunConfig, labels: int = 2) -> nn.Module:
    """The recipe's model with its method attached, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .assets import resolve_model
    from .methods.base import apply_method, default_modules_to_save

    try:
        config = AutoConfig.from_pretrained(resolve_model(cfg.model))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PeftkitError(f"cannot read the model's config: {first}", "model", "check model: in the recipe") from None
    with torch.device("meta"):
        if cfg.decoder and cfg.task != "reward":
            model = AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = 1 if cfg.task == "reward" else labels or 2
            model = AutoModelForSequenceClassification.from_config(config)
        keep = cfg.method.modules_to_save
        if keep is None and not (cfg.decoder and cfg.task != "reward"):
            keep = default_modules_to_save(model, [])
        apply_method(model, cfg.method, keep or [])
    return model


def _quantized_bytes(model: nn.Module, cfg: RunConfig) -> tuple[int, int]:
    """(bytes of the frozen parameters as the run stores them, of the frozen linear weights)."""
    from .inject import is_under, output_embedding_name
    from .methods.base import injection_of

    skip = list(injection_of(model).modules_to_save)
    head = output_embedding_name(model)
    if head:
        skip.append(head)
    quantized: set[int] = set()
    linear = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, nn.Linear)
            and weight is not None
            and not weight.requires_grad
            and not is_under(name, skip)
        ):
            linear += weight.numel()  # the speed layer prepares these, quantization replaces them
            if cfg.quantization is not None:
                quantized.add(id(weight))
    total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in quantized:
            total += p.numel() * 4
        elif cfg.quantization.bits == 8:
            total += p.numel() + p.shape[0] * 4
        else:  # 4-bit blocks of 64 with a float32 scale each (double quantization stores about a quarter)
            scale = 1 if cfg.quantization.double_quant else 4
            total += p.numel() // 2 + (p.numel() // 64) * scale
    return total, linear


def _plain_attention(model: nn.Module) -> None:
    """Have ``model`` attend with PyTorch's SDPA under a name transformers builds no mask for:
    building one reads the mask's values, which meta tensors do not have (the padding-free,
    causal or bidirectional attention a full-length batch needs is the same)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("peftkit_plan", sdpa_attention_forward)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "peftkit_plan"


def activation_bytes(model: nn.Module, cfg: RunConfig, rows: int, length: int, bf16: bool) -> tuple[int, int]:
    """Bytes autograd saves for one training forward of ``rows x length`` tokens, counted on the
    meta device, and the same with gradient checkpointing (each block's input kept, one block's
    activations at a time). bf16: saved tensors count at 2 bytes, as under autocast."""
    from .lm_loss import CHUNK_ELEMENTS, final_hidden_states
    from .sharding import blocks

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        size = 2 if bf16 and t.is_floating_point() else t.element_size()
        saved.setdefault(id(t), t.numel() * size)
        return t

    ids = torch.zeros((rows, length), dtype=torch.long, device="meta")
    inputs = {"input_ids": ids}
    _plain_attention(model)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if cfg.decoder and cfg.task != "reward":
            hidden = final_hidden_states(model, **inputs)
            extra = hidden.numel() * 4 * 2  # the loss's gradient of the hidden states, and the states
            vocab = int(model.config.vocab_size)
            extra += 2 * min(CHUNK_ELEMENTS, rows * length * vocab) * 4  # one chunk of logits and its softmax
        else:
            model(**inputs)
            extra = 0
    total = sum(saved.values()) + extra
    n = max(1, len(blocks(model)))
    hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)
    kept = n * rows * length * hidden_size * (2 if bf16 else 4)
    checkpointed = kept + total // n + extra
    return total, min(total, checkpointed)


def estimate(cfg: RunConfig, processes: int = 1, device: str = "cpu") -> Estimate:
    """The memory a run of ``cfg`` needs per process (see the module's docstring)."""
    from .methods.base import count_parameters
    from .precision import resolve_mixed_precision

    runtime = runtime_bytes()
    length, labels = longest_example(cfg)
    model = meta_model(cfg, labels)
    trainable, total = count_parameters(model)
    tc = cfg.train
    fsdp = tc.distributed.strategy == "fsdp" and processes > 1
    share = processes if fsdp else 1
    base, linear = _quantized_bytes(model, cfg)
    bf16 = resolve_mixed_precision(tc.mixed_precision) == "bf16"
    parts = {"runtime (torch, transformers, peftkit)": runtime, "base weights": base // share}
    speed = device == "cpu" and tc.accel != "off" and not fsdp and cfg.quantization is None
    if speed:
        parts["speed layer (frozen linear weights, prepared)"] = linear * 2 * (2 if bf16 else 4)
    parts["trainable weights"] = trainable * 4 // share
    parts["gradients"] = trainable * 4 // share
    parts["optimizer state"] = trainable * (2 if tc.optimizer == "adamw_8bit" else 8) // share
    act, act_gc = activation_bytes(model, cfg, tc.batch_size, length, bf16)
    parts["activations"] = act_gc if tc.gradient_checkpointing else act
    available, where = available_bytes(device)
    est = Estimate(total, trainable, processes, tc.distributed.strategy if processes > 1 else "one process")
    est.parts, est.activations_checkpointed, est.available, est.where = parts, act_gc, available, where
    est.notes.append(
        f"activations at the longest batch: {tc.batch_size} rows x {length} tokens (the longest training example"
        f"{', cut to data.max_length' if length == cfg.data.max_length else ''})"
    )
    return est


def measure(recipe: str, overrides: list[str], processes: int, steps: int) -> dict[str, Any]:
    """Train ``steps`` optimizer steps of the recipe for real (a few validation and test rows) and
    return the run's summary: its ``peak_rss_bytes`` is process 0's peak resident memory."""
    with tempfile.TemporaryDirectory(prefix="peftkit-plan-") as work:
        args = [recipe, *overrides, f"train.max_steps={steps}", "data.max_eval_samples=8", f"output_dir={work}/run"]
        args += ["overwrite=true", "train.eval_steps=null", "train.report_to=[]"]
        if processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            cmd += ["-m", "peftkit", "train", *args]
        else:
            cmd = [sys.executable, "-m", "peftkit", "train", *args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeftkitError(f"the measuring run failed: {last}", recipe, "run peftkit train on it to see why")
        return json.loads((Path(work) / "run" / "summary.json").read_text())
