"""Every method's options (a recipe's ``method:`` block), importable without torch.

Validating a recipe needs only these classes, so a config error answers before torch and
transformers are loaded. Nothing here imports an implementation: :mod:`.registry` says which
module applies each method. ``to_peft`` / ``from_peft`` write and read the Hugging Face PEFT
``adapter_config.json`` fields; the sizes only an applied method knows (prompt and prefix
tuning's widths) come from the method's own modules (their ``peft_fields()``).

The default target patterns below name the layers of the families peftkit knows
(BERT/RoBERTa/ELECTRA/DeBERTa-v2, DistilBERT, LLaMA/Qwen2/Mistral, GPT-2), as regexes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PeftkitError

if TYPE_CHECKING:
    from torch import nn

#: the output projection of each attention block
ATTENTION_OUTPUT = r".*(\.attention\.output\.dense|\.attention\.out_lin|\.self_attn\.o_proj|\.attn\.c_proj)"
#: the output projection of each feed-forward block
FFN_OUTPUT = r".*(\.layer\.\d+\.output\.dense|\.ffn\.lin2|\.mlp\.down_proj|\.mlp\.c_proj)"
#: key and value projections (GPT-2 fuses q, k and v in ``c_attn``)
KEY_VALUE = r".*\.(key|value|k_proj|v_proj|k_lin|v_lin|key_proj|value_proj|c_attn)"

#: every linear layer except the model's output embedding (LM head)
ALL_LINEAR = "all-linear"
#: the name of the adapter a method puts on a model to train, as peft names it
DEFAULT_ADAPTER = "default"
#: file keys of peft-format adapters start with this, then the module path in the model
KEY_PREFIX = "base_model.model."
#: feed-forward blocks (for the parallel bottleneck placement), in the families of inject.FFN_OUTPUT
FFN_BLOCK = r".*(\.layer\.\d+\.output|\.ffn|\.mlp)"
#: prompt tuning's ``init`` -> peft's ``prompt_tuning_init``
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
#: the file key of prompt and prefix tuning's virtual-token tensor
PROMPT_KEY = "prompt_embeddings"


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT's matching rule for one module name: a list matches a name equal to an entry or
    ending in ``"." + entry``; a string is a regex that must match the whole name."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class MethodConfig(BaseModel):
    """Options every method has; each method subclasses this with its own ``name``.

    Class attributes:
        peft_type: what ``adapter_config.json`` calls the method (peft's name, or a
            ``PEFTKIT_*`` name for methods peft does not have).
    """

    model_config = ConfigDict(extra="forbid")

    peft_type: ClassVar[str] = ""

    name: str
    modules_to_save: list[str] | None = Field(
        None, description="modules trained and saved whole; default: the task head"
    )

    @property
    def label(self) -> str:
        """The method as tables name it (LoRA adds its variants)."""
        return self.name

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields for this method (``task_type`` and base are added by the writer)."""
        return {
            "peft_type": self.peft_type,
            **self.model_dump(exclude={"name"}),
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> MethodConfig:
        """The config an adapter_config.json describes."""
        fields = {k: v for k, v in cfg.items() if k in cls.model_fields and k != "name"}
        return cls(**fields)

    # where each tensor goes in adapter_model.safetensors
    def file_key(self, key: str) -> str:
        return KEY_PREFIX + key

    def model_key(self, file_key: str) -> str:
        return file_key.removeprefix(KEY_PREFIX)


#: ``init_lora_weights`` values that start LoRA beside the base weights as they are
PLAIN_INITS = (True, False, "gaussian")
#: peft's layer-index patterns look for ``<pattern>.<index>.`` in a module name
_DEFAULT_LAYER_INDEX = r".*?\.[^.]*\.(?P<idx>\d+)\."
#: adapter_config.json keys that say nothing about the computation (metadata, defaults of other methods)
METADATA = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
}
#: values of an option peftkit does not know that leave peft's computation as it is
_NEUTRAL: tuple[Any, ...] = (None, False, {}, [], "none", "", "megatron.core")


def refuse_unknown(cfg: dict[str, Any], known: set[str], kind: str) -> None:
    """Refuse, naming it, the first adapter_config.json option outside ``known`` (and metadata)
    whose value changes what peft computes: peftkit reads configs by allow-list, so a peft
    option it does not reproduce can never load with wrong numbers."""
    for key, value in cfg.items():
        if key not in known and key not in METADATA and value not in _NEUTRAL:
            refuse_option(kind, key, value)


def refuse_option(kind: str, key: str, value: Any, why: str = "") -> None:
    raise PeftkitError(
        f"the adapter uses {kind} option {key}={value!r}, which peftkit does not reproduce"
        + (f" ({why})" if why else ""),
        "adapter_config.json",
        "retrain without it, or load this adapter with peft",
    )


def validated(cls: type[BaseModel], kind: str, **fields: Any) -> Any:
    """``cls(**fields)`` for a config read from a file; a validation error becomes one line."""
    try:
        return cls(**fields)
    except ValueError as exc:  # pydantic's ValidationError is one
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"])
        raise PeftkitError(
            f"the adapter's {kind} options are not valid ({where + ': ' if where else ''}{first['msg']})",
            "adapter_config.json",
            "save the adapter again",
        ) from None


def in_layers(name: str, wanted: int | list[int] | None, patterns: str | list[str] | None) -> bool:
    """peft's ``layers_to_transform`` rule: is the targeted module ``name`` in a chosen block?
    The block index follows ``<pattern>.`` (default: the second name part before a number)."""
    if wanted is None or wanted == []:
        return True
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = None
    if not patterns:
        found = re.match(_DEFAULT_LAYER_INDEX, name)
    else:
        for pattern in patterns:
            if (found := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)) is not None:
                break
    if found is None:
        return False
    index = int(found.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def sorted_targets(targets: Any) -> Any:
    """peft writes a target list as a set in any order: read it back sorted."""
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule: the first key that matches the end of
    the module name (as a regex after a dot, or the whole name) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoraConfig(MethodConfig):
    """LoRA options, as written in a recipe's ``method:`` block (peft's names where peft has them)."""

    peft_type: ClassVar[str] = "LORA"

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        ALL_LINEAR, description="name suffixes, a regex, or all-linear (PEFT semantics)"
    )
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised)")
    use_dora: bool = Field(
        False, description="DoRA: a learned magnitude per output row times the direction of W + s B A"
    )
    init_lora_weights: bool | str = Field(
        True,
        description="true (A Kaiming-uniform, B zero), gaussian (A normal), false (both random), "
        "pissa / pissa_niter_N (the top singular directions of W; the base keeps the "
        "residual), olora (a QR factorisation of W; same)",
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module pattern -> its own rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module pattern -> its own alpha")
    layers_to_transform: int | list[int] | None = Field(
        None, description="only the blocks with these indices (with a list of target_modules)"
    )
    layers_pattern: str | list[str] | None = Field(None, description="what precedes the block index in a name")
    lora_bias: bool = Field(False, description="B gets a trainable bias")

    @model_validator(mode="after")
    def _check_init(self) -> LoraConfig:
        init = self.init_lora_weights
        if isinstance(init, str) and not (
            init in ("gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_[1-9]\d*", init)
        ):
            raise ValueError(
                f"init_lora_weights {init!r} is not one of true, false, gaussian, pissa, pissa_niter_N, olora"
            )
        if any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError("rank_pattern ranks must be positive")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora and lora_bias do not go together (a merged DoRA layer could not keep the bias)")
        if self.use_dora and isinstance(init, str) and init.startswith("pissa_niter_"):
            raise ValueError("use_dora needs init_lora_weights pissa (exact SVD), not a randomised pissa_niter_N")
        return self

    @property
    def residual_init(self) -> str | None:
        """``pissa``, ``pissa_niter_N`` or ``olora`` when the init changes the base weights, else None."""
        return None if self.init_lora_weights in PLAIN_INITS else str(self.init_lora_weights)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scaling_for(self, name: str) -> float:
        """``s`` of the layer ``name``: its alpha over its rank (or the rank's square root)."""
        r, alpha = self.rank_for(name), float(pattern_value(self.alpha_pattern, name, self.alpha))
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def scaling(self) -> float:
        """``s`` of layers that no pattern names."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def variant(self) -> str | None:
        """The first option that makes this more than a pair of factors per layer with one scale,
        or None: ``use_dora``, ``lora_bias``, a residual init, then rank or alpha patterns (last,
        so a caller that takes patterns can accept those two names and nothing heavier hides)."""
        for key, plain in (("use_dora", False), ("lora_bias", False)):
            if getattr(self, key) != plain:
                return key
        if self.residual_init:
            return f"init_lora_weights={self.residual_init}"
        return next((key for key in ("rank_pattern", "alpha_pattern") if getattr(self, key)), None)

    def in_layers(self, name: str) -> bool:
        """peft's ``layers_to_transform`` rule for a targeted module ``name`` (a regex target
        string already says which blocks it wants)."""
        return isinstance(self.target_modules, str) or in_layers(name, self.layers_to_transform, self.layers_pattern)

    @property
    def label(self) -> str:
        """The method as tables name it: ``lora``, or ``lora+dora``, ``lora+pissa``..."""
        extra = [k for k, on in (("dora", self.use_dora), ("rslora", self.use_rslora), ("bias", self.lora_bias)) if on]
        return "+".join(["lora", *extra, *([str(self.init_lora_weights)] if self.residual_init else [])])

    # --- the Hugging Face PEFT file format -------------------------------------------
    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields as ``peft`` writes them for a LoRA adapter."""
        targets, modules_to_save = injection.replaced, injection.modules_to_save
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in targets)
        listed = self.target_modules == ALL_LINEAR
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            # all-linear is stored as the layers it chose, so any reader gets the same set
            "target_modules": targets if listed else self.target_modules,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": modules_to_save or None,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": conv1d,  # GPT-2's Conv1D stores weights transposed
            "bias": "none",
            "init_lora_weights": self.init_lora_weights,
            "use_dora": self.use_dora,
            # the chosen layers already honour layers_to_transform when they are listed
            "layers_to_transform": None if listed else self.layers_to_transform,
            "layers_pattern": None if listed else self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "lora_bias": self.lora_bias,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> LoraConfig:
        """Read a ``peft`` LoRA adapter_config.json; refuses, naming it, any option whose effect
        peftkit does not reproduce exactly."""
        known = {
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "exclude_modules",
            "modules_to_save",
            "use_rslora",
            "fan_in_fan_out",
            "init_lora_weights",
            "use_dora",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
            "lora_bias",
        }
        refuse_unknown(cfg, known, "LoRA")
        init = cfg.get("init_lora_weights", True)
        if init not in (*PLAIN_INITS, "pissa", "olora"):
            niter = isinstance(init, str) and init.startswith("pissa_niter_")
            refuse_option(
                "LoRA",
                "init_lora_weights",
                init,
                "its residual base comes from a randomised SVD that "
                "cannot be recomputed on load; convert it to a plain LoRA adapter with peft"
                if niter
                else "",
            )
        return validated(
            cls,
            "LoRA",
            r=cfg["r"],
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0),
            target_modules=sorted_targets(cfg.get("target_modules")),
            exclude_modules=cfg.get("exclude_modules"),
            modules_to_save=list(cfg.get("modules_to_save") or []),
            use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=bool(cfg.get("use_dora", False)),
            init_lora_weights=init,
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            layers_to_transform=cfg.get("layers_to_transform"),
            layers_pattern=cfg.get("layers_pattern"),
            lora_bias=bool(cfg.get("lora_bias", False)),
        )


class BottleneckConfig(MethodConfig):
    """Bottleneck adapter options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PEFTKIT_BOTTLENECK"

    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: float = Field(16.0, gt=0, description="bottleneck = hidden size / reduction_factor")
    bottleneck_size: int | None = Field(None, gt=0, description="set the bottleneck width directly")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    residual: bool = Field(True, description="add the adapter to its input (h + f(h)); false: f(h) only")
    scaling: float = Field(1.0, description="factor s on the adapter's output")
    attention_modules: str | list[str] = Field(ATTENTION_OUTPUT, description="attention output projections")
    ffn_modules: str | list[str] = Field(FFN_OUTPUT, description="feed-forward output projections")
    ffn_blocks: str | list[str] = Field(FFN_BLOCK, description="feed-forward blocks (parallel placement)")

    def width(self, dim: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        if self.reduction_factor > dim:
            raise PeftkitError(
                f"reduction_factor {self.reduction_factor:g} is larger than the hidden size {dim}",
                "method.reduction_factor",
                f"use a value up to {dim}, or set bottleneck_size",
            )
        return max(1, int(dim // self.reduction_factor))

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        return {**super().to_peft(injection, model), "target_modules": injection.replaced}


class IA3Config(MethodConfig):
    """IA3 options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "IA3"

    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] = Field(
        f"{KEY_VALUE}|{FFN_OUTPUT}", description="layers to rescale; default: keys, values, feed-forward outputs"
    )
    feedforward_modules: str | list[str] = Field(FFN_OUTPUT, description="targets whose input (not output) is rescaled")
    exclude_modules: str | list[str] | None = None

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        layers = [model.get_submodule(n) for n in injection.replaced]
        return {
            "peft_type": "IA3",
            # stored as the layers chosen, so peft's suffix matching selects exactly these
            "target_modules": injection.replaced,
            "feedforward_modules": [n for n in injection.replaced if name_matches(n, self.feedforward_modules)],
            "exclude_modules": None,
            "modules_to_save": injection.modules_to_save or None,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in layers),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> IA3Config:
        refuse_unknown(
            cfg,
            {
                "target_modules",
                "feedforward_modules",
                "exclude_modules",
                "modules_to_save",
                "fan_in_fan_out",
                "init_ia3_weights",
            },
            "IA3",
        )
        return validated(
            cls,
            "IA3",
            target_modules=sorted_targets(cfg["target_modules"]),
            feedforward_modules=sorted_targets(cfg.get("feedforward_modules") or []),
            exclude_modules=sorted_targets(cfg.get("exclude_modules")),
            modules_to_save=list(cfg.get("modules_to_save") or []),
        )


class PromptLearningConfig(MethodConfig):
    """What prompt and prefix tuning share: virtual tokens, and peft's file keys for them."""

    num_virtual_tokens: int = Field(20, gt=0, description="number of learned virtual tokens")

    @staticmethod
    def check_peft(cfg: dict[str, Any], known: set[str], kind: str) -> None:
        """The checks every virtual-token adapter_config.json passes: one transformer stack (no
        encoder-decoder models), and no option outside what peftkit reproduces."""
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise PeftkitError(f"{kind} for encoder-decoder models is not supported", "adapter_config.json")
        refuse_unknown(
            cfg,
            known
            | {
                "num_virtual_tokens",
                "token_dim",
                "num_transformer_submodules",
                "num_attention_heads",
                "num_layers",
                "modules_to_save",
            },
            kind,
        )

    def file_key(self, key: str) -> str:
        return key if key == PROMPT_KEY else "base_model." + key

    def model_key(self, file_key: str) -> str:
        return file_key if file_key == PROMPT_KEY else file_key.removeprefix("base_model.")


class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    name: Literal["prompt"] = "prompt"
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="random vectors, embeddings of random vocabulary tokens, or of init_text"
    )
    init_text: str | None = Field(None, description="text whose token embeddings start the prompt")

    @model_validator(mode="after")
    def _text_init(self) -> PromptTuningConfig:
        if self.init_text and self.init == "random":
            self.init = "text"
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        return self

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            **module_fields(model),  # token_dim
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "prompt_tuning_init": INITS[self.init],
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": getattr(config, "_name_or_path", None) or None,
            "tokenizer_kwargs": None,
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> PromptTuningConfig:
        cls.check_peft(
            cfg,
            {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
            "prompt tuning",
        )
        # the file's weights replace any initialisation: loading needs no tokenizer
        return cls(
            num_virtual_tokens=cfg["num_virtual_tokens"],
            init="random",
            modules_to_save=list(cfg.get("modules_to_save") or []),
        )


class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    name: Literal["prefix"] = "prefix"
    prefix_projection: bool = Field(False, description="train the prefixes through an MLP (reparameterisation)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the MLP's width; default: the hidden size")
    init: Literal["random", "vocab"] = Field(
        "vocab", description="start from the keys/values of random vocabulary tokens, or from noise"
    )

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            **module_fields(model),  # token_dim, num_attention_heads, num_layers, encoder_hidden_size
            "num_transformer_submodules": 1,
            "prefix_projection": self.prefix_projection,
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> PrefixTuningConfig:
        cls.check_peft(cfg, {"prefix_projection", "encoder_hidden_size"}, "prefix tuning")
        # files hold the projected prefixes: loading needs no MLP
        return cls(
            num_virtual_tokens=cfg["num_virtual_tokens"],
            prefix_projection=False,
            init="random",
            modules_to_save=list(cfg.get("modules_to_save") or []),
        )


class BitFitConfig(MethodConfig):
    """BitFit: train the bias terms only (plus the saved modules)."""

    peft_type: ClassVar[str] = "PEFTKIT_BITFIT"

    name: Literal["bitfit"] = "bitfit"


class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter trains; the "adapter" is the whole model's weights."""

    peft_type: ClassVar[str] = "PEFTKIT_FULL"

    name: Literal["full"] = "full"


def module_fields(model: Any) -> dict[str, Any]:
    """adapter_config.json fields that a method's own modules report (``peft_fields()``): the
    sizes only an applied method knows, such as prompt and prefix tuning's widths."""
    fields: dict[str, Any] = {}
    for module in model.modules():
        report = getattr(module, "peft_fields", None)
        if callable(report):
            fields.update(report())
    return fields
