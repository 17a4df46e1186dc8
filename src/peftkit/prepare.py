"""Everything a training run loads and checks before its first step.

Data, model, quantization and method (:func:`prepare`), the output folder, a resume's
config, and the optimizer. Every input error surfaces here, before anything is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunConfig, TrainConfig
from .errors import PeftkitError

# The checks here run before torch loads (a bad recipe or output folder answers at once;
# tests/test_config.py checks it), so what needs torch is imported inside the functions using it.
from .methods.registry import check_quantizable, method_of

if TYPE_CHECKING:  # torch loads when a run starts, not for the output-folder checks
    import torch


@dataclass
class Prepared:
    """Everything loaded and checked before the first write to ``output_dir``."""

    model: Any
    tokenizer: Any
    task: Any  # tasks.ClassificationTask or tasks.CausalLMTask: features, batches, loss, evaluation
    quantization: Any = None  # a QuantizationReport when the base was quantized


RUN_OUTPUTS = (
    "adapter",
    "checkpoints",
    "metrics.jsonl",
    "completions.jsonl",
    "summary.json",
    "config.yaml",
    "curves.png",
    "tensorboard",
    "wandb",
    "mlruns",
)


def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse a non-empty ``output_dir`` unless ``overwrite`` is set (nothing is lost)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PeftkitError("output_dir is a file", str(out), "choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise PeftkitError(
            "output_dir exists and is not empty",
            str(out),
            "choose another output_dir=..., or pass overwrite=true to replace it",
        )
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

    from .methods.base import apply_method, default_modules_to_save, resolve_modules_to_save
    from .models import load_causal_lm, load_classifier
    from .tasks import build_task

    if cfg.train.low_memory:
        release_freed_memory()
    lm = cfg.decoder
    method_cfg = cfg.method
    init = None
    if cfg.train.init_adapter:
        from .adapter_io import read_adapter

        init = read_adapter(cfg.train.init_adapter)
        method_cfg = init.method_config()
    if lm and cfg.data.packing and method_of(method_cfg).virtual_tokens:
        raise PeftkitError(
            f"data.packing cannot be combined with {method_cfg.name} tuning",
            "data.packing",
            "set data.packing: false (virtual tokens would be shared across packed examples)",
        )
    splits, names = load_data(cfg)
    set_seed(cfg.seed)  # a new head's initialisation is part of the run
    if cfg.task == "reward":
        from .reward import SCORE

        base = load_classifier(cfg.model, [SCORE])
    else:
        base = load_causal_lm(cfg.model) if lm else load_classifier(cfg.model, names)
    task = build_task(cfg, base.tokenizer, splits, names)
    keep = method_cfg.modules_to_save
    if keep is None:
        keep = default_modules_to_save(base.model, base.newly_initialized)
    report = None
    if cfg.quantization is not None:
        from .quantize import quantize_model

        check_quantizable(method_cfg)
        report = quantize_model(base.model, cfg.quantization, skip=resolve_modules_to_save(base.model, keep))
    apply_method(base.model, method_cfg, keep, tokenizer=base.tokenizer)
    if init is not None:
        from .methods.saving import load_adapter_weights

        load_adapter_weights(base.model, init.path)
    if cfg.task == "preference":
        _attach_reference(base.model, task, cfg, cfg.preference.reference, cfg.preference.uses_reference)
    if cfg.task == "grpo":
        _attach_reference(base.model, task, cfg, cfg.grpo.reference, cfg.grpo.beta > 0)
        _attach_rewards(base.model, base.tokenizer, task, cfg)
    if cfg.train.gradient_checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.model.enable_input_require_grads()
    return Prepared(base.model, base.tokenizer, task, report)


def load_data(cfg: RunConfig) -> tuple[dict[str, Any], list[str] | None]:
    """The run's splits, loaded and converted, and its label names (None for unlabelled data)."""
    from .data import infer_label_names, load_splits

    splits = load_splits(cfg.dataset, cfg.data, cfg.seed, convert=_converter(cfg))
    labelled = cfg.task == "classification" or getattr(splits["train"], "kind", "") == "labelled"
    names = infer_label_names(splits["train"], cfg.data.label_names) if labelled else None
    return splits, names


def _converter(cfg: RunConfig) -> Callable[..., Any] | None:
    """How a loaded table becomes the task's rows (None: text/label columns)."""
    if cfg.task == "preference":
        from .pairs import to_pair_rows

        return to_pair_rows
    if cfg.task == "reward":
        from functools import partial

        from .reward import to_reward_rows

        return partial(to_reward_rows, margin_column=cfg.reward.margin_column)
    if cfg.task == "causal_lm":
        from .causal import to_rows

        return to_rows
    if cfg.task == "grpo":
        from .grpo_task import to_prompt_rows

        return to_prompt_rows
    return None


def _attach_reference(model: Any, task: Any, cfg: RunConfig, reference: str | None, wanted: bool) -> None:
    """A preference or GRPO run's reference: the adapter ``reference`` (else the starting
    adapter ``train.init_adapter``) loaded frozen beside the trained one, or the base alone."""
    from .adapter_io import read_adapter, read_adapter_weights
    from .methods.named import NamedAdapters
    from .preference import REFERENCE, folder_digest

    folder = reference or cfg.train.init_adapter
    if folder is None or not wanted:
        return
    files = read_adapter(folder)
    method = files.method_config()
    NamedAdapters(model).add(REFERENCE, method, read_adapter_weights(files.path, method), where=str(folder))
    task.reference.adapter = str(folder)
    if hasattr(task, "cache_key"):
        task.cache_key += f"\0reference {folder_digest(files.path)}"


def _attach_rewards(model: Any, tokenizer: Any, task: Any, cfg: RunConfig) -> None:
    """A GRPO run's rewards (:mod:`peftkit.rewards`): functions loaded, adapters put on the
    policy's base (or, when asked or when they cannot share it, on a base of their own)."""
    import torch

    with torch.random.fork_rng(devices=[]):  # loading them draws no number the run would have drawn
        _add_rewards(model, tokenizer, task, cfg)


def _add_rewards(model: Any, tokenizer: Any, task: Any, cfg: RunConfig) -> None:
    from .rewards import AdapterReward, FunctionReward, load_function

    titles: set[str] = set()
    for i, source in enumerate(cfg.rewards):
        where = f"rewards[{i}]"
        title = source.title if source.title not in titles else f"{source.title}-{i}"
        titles.add(title)
        if source.function is not None:
            task.rewards.append(FunctionReward(title, load_function(source.function, where), source.weight, where))
        else:
            scorer = _adapter_scorer(model, tokenizer, cfg, i, where)
            task.rewards.append(AdapterReward(title, scorer, source.weight, where))


def _adapter_scorer(model: Any, tokenizer: Any, cfg: RunConfig, i: int, where: str) -> Callable[[list[str]], list]:
    """How the reward adapter ``cfg.rewards[i]`` scores texts: a classifier's probability of its
    ``label``, or a reward model's score."""
    from .adapter_io import read_adapter, read_adapter_weights
    from .methods.named import NamedAdapters, shares_a_base
    from .multi import adapter_task, load_named, predict_rows
    from .predict import label_names_of
    from .rewards import ScoreHead, shared_scorer

    source = cfg.rewards[i]
    files = read_adapter(source.adapter)
    kind = adapter_task(files)
    fix = "give a classifier adapter with label: NAME, or a task reward adapter"
    if kind == "causal_lm":
        raise PeftkitError("the reward adapter is a causal-LM adapter", f"{where} {source.adapter}", fix)
    if kind == "reward" and source.label is not None:
        raise PeftkitError("a reward adapter scores; it has no label", f"{where} {source.adapter}", "remove label:")
    method = files.method_config()
    state = read_adapter_weights(files.path, method)
    keep = list(method.modules_to_save or [])
    label = None
    if kind == "classification":
        names = label_names_of(files, state, keep, files.base_model or cfg.model)
        if source.label not in names:
            raise PeftkitError(
                f"label {source.label!r} is not one of the classifier's labels {names}",
                f"{where} {source.adapter}",
                f"set label: to one of {', '.join(names)}",
            )
        label = names.index(source.label)
    name = f"reward-{i}"
    same = files.base_model in (None, cfg.model)
    if source.share_base and same and shares_a_base(method) and shares_a_base(cfg.method):
        head, rest = ScoreHead.split_off(state, keep, tokenizer.pad_token_id, None if label is not None else 1)
        if head is None:
            raise PeftkitError("the adapter holds no classification or score head", f"{where} {source.adapter}", fix)
        NamedAdapters(model).add(
            name, method.model_copy(update={"modules_to_save": None}), rest, where=f"{where} {source.adapter}"
        )
        length = int(files.meta.get("max_length") or cfg.data.max_length + cfg.grpo.max_completion_length)
        return shared_scorer(model, tokenizer, name, head, label, length)
    named = load_named([(name, files.path)], files.base_model or cfg.model)

    def score(texts: list[str]) -> list[float]:
        rows = predict_rows(named, texts, [name] * len(texts))
        return [float(r[0] if label is None else r[label]) for r in rows]

    return score


def release_freed_memory(threshold: int = 256 * 1024) -> bool:
    """Make glibc give every freed block over ``threshold`` bytes back to the OS at once.

    By default glibc keeps freed tensor memory in its heap for reuse; training's short-lived
    activations of many sizes leave that heap several times larger than the tensors alive at
    any moment. Served from their own mappings instead,
    large blocks leave when freed, so the peak follows the live tensors, at the price of
    mapping fresh pages for each (slower steps; ``bench/RESULTS-quantization.md``).
    Returns False where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, threshold))  # M_MMAP_THRESHOLD; setting it also stops glibc raising it


def _changed_key(out: Path, cfg: RunConfig) -> tuple[str | None, dict[str, Any]]:
    """The first of what a checkpoint's tensors depend on (task, model, data, method, quantization,
    preference or reward options) that ``cfg`` changes against the run in ``out`` (None if
    none), and that run's config."""
    import yaml

    try:
        old = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raise PeftkitError(
            "the run to resume has no readable config.yaml", str(out), "resume from a complete peftkit run folder"
        ) from None
    if not isinstance(old, dict):
        raise PeftkitError(
            "the run's config.yaml is not a mapping", str(out), "resume from a complete peftkit run folder"
        )
    new = cfg.model_dump(mode="json")
    defaults = RunConfig().model_dump(mode="json")
    for run in (old, new, defaults):  # the token cache changes no token: a run may resume with it either way
        if isinstance(run.get("data"), dict):
            run["data"] = {k: v for k, v in run["data"].items() if k != "token_cache"}
    changed = next(
        (
            k
            for k in (
                "task",
                "model",
                "dataset",
                "method",
                "data",
                "quantization",
                "preference",
                "reward",
                "grpo",
                "rewards",
            )
            if (_with_defaults(old.get(k), defaults.get(k)) if k in _GREW else old.get(k)) != new.get(k)
        ),
        None,
    )
    return changed, old


#: config entries that gained keys since runs were first written (a method block's keys depend on its
#: method, so it is compared as written)
_GREW = ("task", "data", "preference", "reward", "grpo", "rewards")


def _with_defaults(value: Any, default: Any) -> Any:
    """A config entry of a run written before some keys existed, those keys at their defaults."""
    if value is None:
        return default
    if isinstance(value, dict) and isinstance(default, dict):
        return {**default, **value}
    return value


def check_resume_config(out: Path, cfg: RunConfig, say: Callable[[str], None]) -> None:
    """Refuse a resume whose config changes what the checkpoint holds; log what may change."""
    key, old = _changed_key(out, cfg)
    if key is not None:
        raise PeftkitError(
            f"cannot resume with a different '{key}'",
            str(out / "config.yaml"),
            f"keep {key} as it was, or start a new run in another output_dir",
        )
    new = cfg.model_dump(mode="json")
    changed = sorted(
        k for k in set(old.get("train", {})) | set(new["train"]) if old.get("train", {}).get(k) != new["train"].get(k)
    )
    if changed:
        say(
            "resuming with changed settings: "
            + ", ".join(f"train.{k} {old.get('train', {}).get(k)!r} -> {new['train'].get(k)!r}" for k in changed)
        )


def is_own_unfinished_run(out: Path, cfg: RunConfig) -> bool:
    """Whether ``out`` holds nothing but the outputs of this same run (same model, data, method
    and quantization), killed before its first complete checkpoint: ``resume=auto`` then
    starts it again from step 0."""
    if not (out / "config.yaml").is_file() or any(p.name not in RUN_OUTPUTS for p in out.iterdir()):
        return False
    try:
        return _changed_key(out, cfg)[0] is None
    except PeftkitError:
        return False


def param_groups(
    model: torch.nn.Module, lr: float, head_lr: float | None, loraplus_lr_ratio: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer groups: the method's parameters at ``lr``; the saved heads at ``head_lr`` if set;
    with LoRA+ (``loraplus_lr_ratio``) the ``B`` factors of LoRA layers at ``lr * ratio``."""
    from .inject import is_under
    from .methods.base import injection_of, trainable_parameters

    params = trainable_parameters(model)
    heads = injection_of(model).modules_to_save if head_lr is not None else []
    groups: dict[str, dict[str, Any]] = {
        "method": {"params": [], "lr": lr},
        "b": {"params": [], "lr": lr * (loraplus_lr_ratio or 1.0)},
        "head": {"params": [], "lr": head_lr},
    }
    for name, p in params.items():
        if is_under(name, heads):
            groups["head"]["params"].append(p)
        elif loraplus_lr_ratio is not None and ".lora_B." in f".{name}":
            groups["b"]["params"].append(p)
        else:
            groups["method"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable parameters' groups."""
    groups = param_groups(model, tc.lr, tc.head_lr, tc.loraplus_lr_ratio)
    if tc.optimizer == "adamw_8bit":
        from .quantize import require_bitsandbytes

        return require_bitsandbytes().optim.AdamW8bit(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    return adamw(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def adamw(params, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``, fused where every parameter is a float tensor on the CPU or CUDA:
    one kernel for all parameters instead of several ops each."""
    import torch

    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)
