"""Typed run configuration: a YAML recipe plus dotted ``key=value`` overrides.

Validation happens here, once; every later stage trusts the :class:`RunConfig` it gets.
Errors name the key and how to fix it (an unknown key suggests the closest known one).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PeftkitError
from .methods.configs import LoraConfig, MethodConfig
from .methods.registry import METHODS, AnyMethod

#: the label of a position that carries no loss (prompt, padding, virtual tokens): PyTorch's
#: ``cross_entropy`` default ``ignore_index``, which transformers' losses use too
IGNORE_INDEX = -100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(_Strict):
    """A recipe's ``quantization:`` block."""

    bits: Literal[4, 8] = Field(description="8 (LLM.int8 weights) or 4 (NF4 / FP4 blocks)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="4-bit: quantize the block scales too")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="4-bit: dtype of the matmul after dequantizing a block"
    )


class DataConfig(_Strict):
    """How to turn a dataset into (text, label) examples."""

    text_column: str = "text"
    text_pair_column: str | None = Field(None, description="second text for pair tasks (NLI)")
    label_column: str = "label"
    label_names: list[str] | None = Field(
        None, description="names for integer labels 0..K-1 (string labels name themselves)"
    )
    max_length: int = Field(128, ge=8, le=8192, description="tokens per example; longer is truncated")
    train_split: str = "train"
    validation_split: str | None = Field(
        "validation", description="carved from train (validation_fraction) when the dataset lacks it"
    )
    test_split: str | None = Field("test", description="evaluated at the end when present")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(None, gt=0, description="subsample train (quick runs)")
    max_eval_samples: int | None = Field(None, gt=0, description="subsample validation and test")
    token_cache: bool = Field(
        True, description="classification: keep tokenized splits in peftkit's cache folder and reuse them in later runs"
    )
    # task causal_lm: which columns hold what, and how they become one token sequence
    prompt_column: str = Field("prompt", description="causal_lm: prompt/completion data")
    completion_column: str = "completion"
    messages_column: str = Field("messages", description="causal_lm: chat records (role/content lists)")
    prompt_template: str | None = Field(
        None,
        description="causal_lm on labelled data: the prompt, with {text} (and {text_pair}); the "
        "completion is the label name",
    )
    chat_template: bool | None = Field(
        None,
        description="causal_lm: render with the tokenizer's chat "
        "template; default: when it has one (chat records always)",
    )
    system_prompt: str | None = Field(None, description="causal_lm with a chat template: a system message")
    train_on_prompt: bool = Field(False, description="causal_lm: loss on prompt tokens too")
    packing: bool = Field(False, description="causal_lm: pack several training examples per sequence")
    # tasks preference and reward: pairs of answers to one prompt (or KTO's single answers)
    chosen_column: str = Field("chosen", description="preference, reward: the preferred answer")
    rejected_column: str = Field("rejected", description="preference, reward: the dispreferred answer")

    @model_validator(mode="after")
    def _system_needs_chat(self) -> DataConfig:
        if self.system_prompt and self.chat_template is False:
            raise ValueError(
                "data.system_prompt is sent as the chat template's system message, and "
                "data.chat_template is false: set data.chat_template: true, or write the instruction "
                "into data.prompt_template"
            )
        return self


#: validation metrics a run can follow: the best adapter, early stopping
FollowedMetric = Literal["accuracy", "f1", "loss", "rewards/accuracies", "rewards/margins", "reward"]


class EarlyStopping(_Strict):
    """Stop after ``patience`` evaluations without an improvement of at least ``min_delta``."""

    metric: FollowedMetric = "loss"
    patience: int = Field(3, gt=0)
    min_delta: float = Field(0.0, ge=0)


class DistributedConfig(_Strict):
    """How several processes (``torchrun``, ``accelerate launch``) share the training."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: PyTorch's FSDP2 shards every block's "
        "parameters (frozen base included), gradients and optimizer state over the processes",
    )


class TrainConfig(_Strict):
    """Optimisation and evaluation schedule."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(32, gt=0, description="examples per step per process")
    eval_batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0)
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit: bitsandbytes 8-bit states")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    low_memory: bool = Field(
        False, description="hand freed tensor memory back to the OS at once (Linux): lower peak memory, slower steps"
    )
    head_lr: float | None = Field(None, gt=0, description="lr of the saved modules (task head); default: lr")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B factors of LoRA layers train at lr times this (16 in the paper)"
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps; null: each epoch")
    log_steps: int = Field(50, gt=0)
    metric_for_best: FollowedMetric = Field(
        "accuracy", description="preference runs read accuracy as rewards/accuracies (TRL's name)"
    )
    init_adapter: str | None = Field(
        None, description="start the trained adapter from this adapter folder (its method replaces method:)"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the hardware runs bf16 natively (float32 weights and "
        "accumulation), float32 elsewhere",
    )
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps (always at epoch end)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept, besides the best one")
    early_stopping: EarlyStopping | None = Field(None, description="stop when validation stops improving")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="also send metrics to these (metrics.jsonl is always written)"
    )
    group_by_length: bool = Field(True, description="batch similar lengths together (less padding)")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    accel: Literal["auto", "on", "off"] = Field(
        "auto",
        description="the CPU speed layer around training steps (peftkit.accel): auto turns it on for "
        "CPU runs, where it pays; off trains with the model's own modules",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("accel", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class PreferenceConfig(_Strict):
    """A recipe's ``preference:`` block (task preference; TRL's names and defaults)."""

    loss: Literal["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = Field(
        "dpo",
        description="dpo (sigmoid), ipo, hinge, robust: against a reference; simpo, orpo: none; kto: unpaired rows",
    )
    beta: float = Field(0.1, gt=0, description="how far from the reference the policy may go (higher: less)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust: the share of pairs assumed flipped")
    simpo_gamma: float = Field(0.5, description="simpo: the target reward margin")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable answers' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable answers' losses")
    reference: str | None = Field(
        None,
        description="an adapter folder as the reference (frozen, on the same base); default: train.init_adapter "
        "when set, else the base with the adapter off",
    )
    precompute_reference: bool = Field(
        False, description="compute the reference log-probabilities once before the first step (and cache them)"
    )
    disable_dropout: bool = Field(True, description="train without dropout, so policy and reference compare")

    @property
    def uses_reference(self) -> bool:
        return self.loss not in ("simpo", "orpo")


class RewardConfig(_Strict):
    """A recipe's ``reward:`` block (task reward: Bradley-Terry over pairs)."""

    margin_column: str | None = Field(
        None, description="a column of margins: the loss asks r_chosen - r_rejected to exceed it"
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="add this times mean((r_chosen + r_rejected)^2), to keep scores near 0"
    )


class GRPOConfig(_Strict):
    """A recipe's ``grpo:`` block (task grpo; TRL's ``GRPOConfig`` names and defaults where they exist)."""

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (one group)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens reaching this mass")
    max_completion_length: int = Field(256, gt=0, description="tokens per completion at most")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide advantages by the group's reward spread (group, the paper's), the batch's, or not "
        "at all (none, Dr. GRPO)",
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="grpo: mean per completion; dapo: per token of the batch; dr_grpo: per max length"
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="the clip range below (and above, without epsilon_high)")
    epsilon_high: float | None = Field(None, gt=0, description="DAPO's wider clip above (0.28 in the paper)")
    beta: float = Field(0.0, ge=0, description="weight of the KL term against the reference (0: no reference run)")
    num_iterations: int = Field(
        1, ge=1, description="updates per batch of generations (importance ratio after the first)"
    )
    mask_truncated_completions: bool = Field(
        False, description="completions cut at max_completion_length count no loss"
    )
    reference: str | None = Field(
        None, description="an adapter folder as the KL reference (frozen, same base); default: the adapter off"
    )
    log_completions_steps: int | None = Field(
        None, gt=0, description="write sample completions to completions.jsonl every N steps (default: log_steps)"
    )


class RewardSource(_Strict):
    """One item of a recipe's ``rewards:`` list (task grpo): a function or an adapter, and its weight."""

    function: str | None = Field(
        None, description='"path/to/file.py:name" or "module:name": called with prompts, completions and the columns'
    )
    adapter: str | None = Field(None, description="a classifier (with label) or reward adapter folder from peftkit")
    label: str | None = Field(None, description="classifier adapter: the reward is this label's probability")
    weight: float = Field(1.0, description="the reward's weight in the sum")
    share_base: bool = Field(
        True, description="adapter: load it on the policy's base as a frozen named adapter when the bases match"
    )
    name: str | None = Field(None, description="how the log names it (default: the function's or folder's name)")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        if (self.function is None) == (self.adapter is None):
            raise ValueError("each rewards item gives either function: or adapter:")
        if self.label is not None and self.adapter is None:
            raise ValueError("rewards: label goes with adapter:")
        return self

    @property
    def title(self) -> str:
        if self.name:
            return self.name
        if self.function is not None:
            return self.function.rpartition(":")[2]
        folder = Path(self.adapter.rstrip("/"))
        name = (
            folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        )  # a run's adapter/
        return name + (f":{self.label}" if self.label else "")


class RunConfig(_Strict):
    """Everything one ``peftkit train`` run needs."""

    task: Literal["classification", "causal_lm", "preference", "reward", "grpo"] = Field(
        "classification",
        description="classification (a head over labels), causal_lm (next-token loss), preference (DPO and "
        "kin on answer pairs), reward (a scalar score trained on pairs) or grpo (online RL on prompts, "
        "from rewards)",
    )
    model: str = Field("minilm", description="asset name, hub id, or local folder")
    dataset: str = Field("rotten_tomatoes", description="asset name, hub id, local file or folder")
    output_dir: str = "runs/default"
    overwrite: bool = Field(False, description="allow writing into a non-empty output_dir")
    resume: str | None = Field(None, description="auto (newest checkpoint in output_dir) or a checkpoint folder")
    seed: int = 42
    method: AnyMethod = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig | None = Field(None, description="quantize the frozen base (4 or 8 bits)")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    rewards: list[RewardSource] = Field(default_factory=list, description="task grpo: what scores a completion")

    @property
    def decoder(self) -> bool:
        """Whether the run trains a causal LM (next-token, preference or GRPO loss)."""
        return self.task in ("causal_lm", "preference", "grpo")

    @model_validator(mode="after")
    def _grpo_needs_rewards(self) -> RunConfig:
        if self.task == "grpo" and not self.rewards:
            raise ValueError("task grpo needs a rewards: list (function: FILE.py:NAME or adapter: DIR items)")
        return self

    @model_validator(mode="after")
    def _loraplus_needs_lora(self) -> RunConfig:
        if self.train.loraplus_lr_ratio is not None and self.method.name != "lora":
            raise ValueError(f"train.loraplus_lr_ratio needs method lora, not {self.method.name}")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (``["train", "lr"]``, ``0.0003``); values are read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PeftkitError(f"override {text!r} is not key=value", "command line", "write e.g. train.lr=3e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and _looks_numeric(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 as a string
    return key.strip().split("."), parsed


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


#: names users bring from peft and transformers -> ours (used for did-you-mean hints)
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "model_name_or_path": "model",
    "output": "output_dir",
}


#: LoRA variants peft users name as methods -> the options that choose them
VARIANTS = {
    "dora": "method.use_dora=true",
    "rslora": "method.use_rslora=true",
    "pissa": "method.init_lora_weights=pissa",
    "olora": "method.init_lora_weights=olora",
    "qlora": "quantization.bits=4",
    "lora+": "train.loraplus_lr_ratio=16",
    "loraplus": "train.loraplus_lr_ratio=16",
}


def _check_keys(data: Any, model: type[BaseModel], prefix: str, where: str) -> None:
    """Reject unknown keys with a did-you-mean, before pydantic sees them."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            if model is not LoraConfig and issubclass(model, MethodConfig) and key in LoraConfig.model_fields:
                raise PeftkitError(
                    f"'{prefix}{key}' is a LoRA option; method {model.model_fields['name'].default} does not take it",
                    where,
                    f"use method.name: lora, or remove '{prefix}{key}'",
                )
            known = sorted(fields)
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in fields else []
            close = close or difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise PeftkitError(f"unknown key '{prefix}{key}'", where, hint)
        sub = _submodel(model, key, value)
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.", where)


def _submodel(model: type[BaseModel], key: str, value: Any) -> type[BaseModel] | None:
    if model is RunConfig and key == "method":
        name = value.get("name", "lora") if isinstance(value, dict) else "lora"
        if name not in METHODS:
            if str(name).lower() in VARIANTS:
                raise PeftkitError(
                    f"{name} is a variant of LoRA, not a method of its own",
                    "method.name",
                    f"use method.name=lora with {VARIANTS[str(name).lower()]}",
                )
            close = difflib.get_close_matches(str(name), list(METHODS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise PeftkitError(f"unknown method '{name}'", "method.name", f"{hint}choose one of: {', '.join(METHODS)}")
        return METHODS[name].config
    ann = model.model_fields[key].annotation
    for option in (ann, *typing.get_args(ann)):  # X, or X | None
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def _set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def build_config(data: dict[str, Any], where: str = "recipe") -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`."""
    _check_keys(data, RunConfig, "", where)
    if isinstance(data.get("method"), dict) and "name" not in data["method"]:
        data = {**data, "method": {**data["method"], "name": "lora"}}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHODS:
            del loc[1]  # the union's tag
        key = ".".join(str(p) for p in loc if not str(p).startswith(("function-", "union[")))
        value = err.get("input")
        msg = err["msg"].replace("\n", " ")
        if isinstance(value, dict):  # a check across options: its own words say what is wrong
            raise PeftkitError(
                msg.removeprefix("Value error, "), where, f"change the {key or 'recipe'} options"
            ) from None
        raise PeftkitError(f"invalid value {value!r} for '{key}'", where, msg) from None


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or start from defaults), apply overrides, validate.

    Raises:
        PeftkitError: unreadable or malformed YAML, unknown keys, invalid values.
    """
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PeftkitError("recipe not found", where, "pass a YAML file from recipes/") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PeftkitError(f"cannot read the recipe: {exc}", where) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise PeftkitError(f"the recipe is not valid YAML{line}", where, "fix the syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PeftkitError("the recipe must be a YAML mapping of keys", where)
        data = loaded or {}
        _check_keys(data, RunConfig, "", where)  # the file's own mistakes are the file's, not an override's
    for text in overrides:
        keys, value = parse_override(text)
        method = data.get("method")
        if keys == ["method", "name"] and isinstance(method, dict) and method.get("name", "lora") != value:
            data["method"] = {}  # the recipe's options were for the other method
        _set_dotted(data, keys, value)
        where_o = f"{where}, override {text}" if path else f"override {text}"
        _check_keys(data, RunConfig, "", where_o)
    return build_config(data, where)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written next to a run's outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
