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
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PeftkitError

if TYPE_CHECKING:
    from torch import nn

#: every linear layer except the model's output embedding (LM head)
ALL_LINEAR = "all-linear"
#: the output projection of each attention block
ATTENTION_OUTPUT = r".*(\.attention\.output\.dense|\.attention\.out_lin|\.self_attn\.o_proj|\.attn\.c_proj)"
#: the output projection of each feed-forward block
FFN_OUTPUT = r".*(\.layer\.\d+\.output\.dense|\.ffn\.lin2|\.mlp\.down_proj|\.mlp\.c_proj)"
#: key and value projections (GPT-2 fuses q, k and v in ``c_attn``)
KEY_VALUE = r".*\.(key|value|k_proj|v_proj|k_lin|v_lin|key_proj|value_proj|c_attn)"

#: file keys of peft-format adapters start with this, then the module path in the model
KEY_PREFIX = "base_model.model."
#: feed-forward blocks (for the parallel bottleneck placement), in the families of inject.FFN_OUTPUT
FFN_BLOCK = r".*(\.layer\.\d+\.output|\.ffn|\.mlp)"
#: prompt tuning's ``init`` -> peft's ``prompt_tuning_init``
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
#: the file key of prompt and prefix tuning's virtual-token tensor
PROMPT_KEY = "prompt_embeddings"


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

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields for this method (``task_type`` and base are added by the writer)."""
        return {"peft_type": self.peft_type, **self.model_dump(exclude={"name"}),
                "modules_to_save": injection.modules_to_save or None}

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "MethodConfig":
        """The config an adapter_config.json describes."""
        fields = {k: v for k, v in cfg.items() if k in cls.model_fields and k != "name"}
        return cls(**fields)

    # where each tensor goes in adapter_model.safetensors
    def file_key(self, key: str) -> str:
        return KEY_PREFIX + key

    def model_key(self, file_key: str) -> str:
        return file_key.removeprefix(KEY_PREFIX)


class LoraConfig(MethodConfig):
    """LoRA options, as written in a recipe's ``method:`` block."""

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

    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # --- the Hugging Face PEFT file format -------------------------------------------
    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        """adapter_config.json fields as ``peft`` writes them for a LoRA adapter."""
        targets, modules_to_save = injection.replaced, injection.modules_to_save
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in targets)
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            # all-linear is stored as the layers it chose, so any reader gets the same set
            "target_modules": targets if self.target_modules == ALL_LINEAR else self.target_modules,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": modules_to_save or None,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": conv1d,  # GPT-2's Conv1D stores weights transposed
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "LoraConfig":
        """Read a ``peft`` LoRA adapter_config.json; refuses options peftkit does not implement."""
        unsupported = {
            "use_dora": False, "bias": "none", "layers_to_transform": None, "lora_bias": False,
            "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
            "trainable_token_indices": None, "layer_replication": None, "use_qalora": False,
        }
        for key, neutral in unsupported.items():
            if cfg.get(key, neutral) not in (neutral, None, {}, False):
                raise PeftkitError(
                    f"the adapter uses LoRA option {key}={cfg[key]!r}, which peftkit does not support",
                    "adapter_config.json",
                    "retrain without it, or load this adapter with peft",
                )
        targets = cfg.get("target_modules")
        if isinstance(targets, (list, tuple, set)):
            targets = sorted(targets)
        return cls(
            r=cfg["r"],
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0),
            target_modules=targets,
            exclude_modules=cfg.get("exclude_modules"),
            modules_to_save=list(cfg.get("modules_to_save") or []),
            use_rslora=bool(cfg.get("use_rslora", False)),
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
            raise PeftkitError(f"reduction_factor {self.reduction_factor:g} is larger than the hidden size {dim}",
                               "method.reduction_factor", f"use a value up to {dim}, or set bottleneck_size")
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
    feedforward_modules: str | list[str] = Field(
        FFN_OUTPUT, description="targets whose input (not output) is rescaled"
    )
    exclude_modules: str | list[str] | None = None

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        layers = [model.get_submodule(n) for n in injection.replaced]
        return {
            "peft_type": "IA3",
            # stored as the layers chosen, so peft's suffix matching selects exactly these
            "target_modules": injection.replaced,
            "feedforward_modules": [n for n, m in zip(injection.replaced, layers) if m.feedforward],
            "exclude_modules": None,
            "modules_to_save": injection.modules_to_save or None,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in layers),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "IA3Config":
        def norm(v: Any) -> Any:
            return sorted(v) if isinstance(v, (list, tuple, set)) else v

        return cls(target_modules=norm(cfg["target_modules"]),
                   feedforward_modules=norm(cfg.get("feedforward_modules") or []),
                   exclude_modules=norm(cfg.get("exclude_modules")),
                   modules_to_save=list(cfg.get("modules_to_save") or []))


class PromptLearningConfig(MethodConfig):
    """What prompt and prefix tuning share: virtual tokens, and peft's file keys for them."""

    num_virtual_tokens: int = Field(20, gt=0, description="number of learned virtual tokens")

    def file_key(self, key: str) -> str:
        return key if key == PROMPT_KEY else "base_model." + key

    def model_key(self, file_key: str) -> str:
        return file_key if file_key == PROMPT_KEY else file_key.removeprefix("base_model.")


class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    name: Literal["prompt"] = "prompt"
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="random vectors, embeddings of random vocabulary tokens, or of init_text")
    init_text: str | None = Field(None, description="text whose token embeddings start the prompt")

    @model_validator(mode="after")
    def _text_init(self) -> "PromptTuningConfig":
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
    def from_peft(cls, cfg: dict[str, Any]) -> "PromptTuningConfig":
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise PeftkitError("prompt tuning for encoder-decoder models is not supported", "adapter_config.json")
        # the file's weights replace any initialisation: loading needs no tokenizer
        return cls(num_virtual_tokens=cfg["num_virtual_tokens"], init="random",
                   modules_to_save=list(cfg.get("modules_to_save") or []))


class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning options, as written in a recipe's ``method:`` block."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    name: Literal["prefix"] = "prefix"
    prefix_projection: bool = Field(False, description="train the prefixes through an MLP (reparameterisation)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the MLP's width; default: the hidden size")
    init: Literal["random", "vocab"] = Field(
        "vocab", description="start from the keys/values of random vocabulary tokens, or from noise")

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
    def from_peft(cls, cfg: dict[str, Any]) -> "PrefixTuningConfig":
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise PeftkitError("prefix tuning for encoder-decoder models is not supported", "adapter_config.json")
        # files hold the projected prefixes: loading needs no MLP
        return cls(num_virtual_tokens=cfg["num_virtual_tokens"], prefix_projection=False, init="random",
                   modules_to_save=list(cfg.get("modules_to_save") or []))


class BitFitConfig(MethodConfig):
    """BitFit: train the bias terms only (plus the saved modules)."""

    peft_type: ClassVar[str] = "PEFTKIT_BITFIT"

    name: Literal["bitfit"] = "bitfit"


class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter trains; the "adapter" is the whole model's weights."""

    peft_type: ClassVar[str] = "PEFTKIT_FULL"

    name: Literal["full"] = "full"


#: every method's config class, in the order recipes and tables list them
CONFIGS: tuple[type[MethodConfig], ...] = (LoraConfig, BottleneckConfig, PrefixTuningConfig, PromptTuningConfig,
                                           IA3Config, BitFitConfig, FullConfig)

#: the type of a recipe's ``method:`` block: one of the configs, chosen by ``name``
AnyMethod = Annotated[Union[CONFIGS], Field(discriminator="name")]


def module_fields(model: Any) -> dict[str, Any]:
    """adapter_config.json fields that a method's own modules report (``peft_fields()``): the
    sizes only an applied method knows, such as prompt and prefix tuning's widths."""
    fields: dict[str, Any] = {}
    for module in model.modules():
        report = getattr(module, "peft_fields", None)
        if callable(report):
            fields.update(report())
    return fields
