"""Options of the tuners beyond LoRA's own family: VeRA, LoHa, LoKr, AdaLoRA and P-tuning
(a recipe's ``method:`` block), importable without torch.

Each writes and reads its ``adapter_config.json`` under peft's type and field names, and reads
by allow-list (:func:`~.configs.refuse_unknown`): a peft option whose effect peftkit does not
reproduce is refused on load, naming it. Options that only choose a starting point
(``init_weights``) are read and ignored, since the file's tensors replace any start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from .configs import (
    ALL_LINEAR,
    DEFAULT_ADAPTER,
    MethodConfig,
    PromptLearningConfig,
    module_fields,
    pattern_value,
    refuse_option,
    refuse_unknown,
    sorted_targets,
    validated,
)
from .configs import in_layers as _in_layers

if TYPE_CHECKING:
    from torch import nn

Targets = str | list[str]


class TargetedConfig(MethodConfig):
    """What the layer-wrapping tuners share: which linear layers, and which blocks of them."""

    target_modules: Targets = Field(ALL_LINEAR, description="name suffixes, a regex, or all-linear (PEFT semantics)")
    exclude_modules: Targets | None = None
    layers_to_transform: int | list[int] | None = Field(
        None, description="only the blocks with these indices (with a list of target_modules)"
    )
    layers_pattern: str | list[str] | None = Field(None, description="what precedes the block index in a name")

    #: adapter_config.json keys every targeted tuner reads
    TARGET_KEYS: ClassVar[set[str]] = {
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "fan_in_fan_out",
    }

    def in_layers(self, name: str) -> bool:
        return isinstance(self.target_modules, str) or _in_layers(name, self.layers_to_transform, self.layers_pattern)

    def target_fields(self, injection: Any) -> dict[str, Any]:
        """The targeting fields as peft writes them; all-linear is stored as the layers it chose."""
        listed = self.target_modules == ALL_LINEAR
        return {
            "target_modules": injection.replaced if listed else self.target_modules,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": injection.modules_to_save or None,
            "layers_to_transform": None if listed else self.layers_to_transform,
            "layers_pattern": None if listed else self.layers_pattern,
        }

    @staticmethod
    def read_targets(cfg: dict[str, Any]) -> dict[str, Any]:
        return {
            "target_modules": sorted_targets(cfg.get("target_modules")),
            "exclude_modules": sorted_targets(cfg.get("exclude_modules")),
            "modules_to_save": list(cfg.get("modules_to_save") or []),
            "layers_to_transform": cfg.get("layers_to_transform"),
            "layers_pattern": cfg.get("layers_pattern"),
        }


class VeraConfig(TargetedConfig):
    """VeRA: one pair of frozen random projections shared by every targeted layer, and two
    trained scaling vectors per layer: ``y = W x + b + lambda_b * (B (lambda_d * (A x)))``."""

    peft_type: ClassVar[str] = "VERA"

    name: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, description="rows of the shared projection A (at most the narrowest targeted layer)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the update")
    d_initial: float = Field(0.1, description="the start of every lambda_d entry")
    projection_prng_key: int = Field(0, description="seed of the shared projections")
    save_projection: bool = Field(
        True, description="write the projections into the adapter file (else readers regenerate them from the seed)"
    )

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in injection.replaced)
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            **self.target_fields(injection),
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "init_weights": True,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> VeraConfig:
        refuse_unknown(
            cfg,
            cls.TARGET_KEYS
            | {"r", "vera_dropout", "d_initial", "projection_prng_key", "save_projection", "init_weights"},
            "VeRA",
        )
        return validated(
            cls,
            "VeRA",
            r=cfg.get("r", 256),
            dropout=cfg.get("vera_dropout", 0.0),
            d_initial=cfg.get("d_initial", 0.1),
            projection_prng_key=cfg.get("projection_prng_key", 0),
            save_projection=cfg.get("save_projection", True),
            **cls.read_targets(cfg),
        )

    # the shared projections sit at the top of peft's file: base_model.vera_A, base_model.vera_B
    def file_key(self, key: str) -> str:
        return "base_model." + key if key in ("vera_A", "vera_B") else super().file_key(key)

    def model_key(self, file_key: str) -> str:
        if file_key in ("base_model.vera_A", "base_model.vera_B"):
            return file_key.removeprefix("base_model.")
        return super().model_key(file_key)


class LycorisConfig(TargetedConfig):
    """What LoHa and LoKr share: a rank, a scale ``alpha / r``, per-layer patterns and LyCORIS's
    training-time dropouts (of the whole update per layer, and of rows of it)."""

    r: int = Field(8, gt=0, description="rank of the factors")
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha / r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: drop rows of the update")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: skip a layer's whole update")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module pattern -> its own rank")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module pattern -> its own alpha")

    #: adapter_config.json keys both read (use_effective_conv2d only concerns convolutions)
    LYCORIS_KEYS: ClassVar[set[str]] = {
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "rank_pattern",
        "alpha_pattern",
        "init_weights",
        "use_effective_conv2d",
    }

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scaling_for(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.alpha)) / self.rank_for(name)

    def lycoris_fields(self, injection: Any) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "alpha": self.alpha,
            **self.target_fields(injection),
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_effective_conv2d": False,
            "init_weights": True,
        }

    @classmethod
    def read_lycoris(cls, cfg: dict[str, Any], kind: str, **extra: Any) -> Any:
        return validated(
            cls,
            kind,
            r=cfg.get("r", 8),
            alpha=cfg.get("alpha", 8.0),
            rank_dropout=cfg.get("rank_dropout", 0.0),
            module_dropout=cfg.get("module_dropout", 0.0),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            **cls.read_targets(cfg),
            **extra,
        )


class LoHaConfig(LycorisConfig):
    """LoHa: the update is the Hadamard (element-wise) product of two rank-``r`` products,
    ``s * (W1a W1b) * (W2a W2b)``: rank up to ``r^2`` for the parameters of two LoRAs."""

    peft_type: ClassVar[str] = "LOHA"

    name: Literal["loha"] = "loha"

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        return self.lycoris_fields(injection)

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> LoHaConfig:
        refuse_unknown(cfg, cls.TARGET_KEYS | cls.LYCORIS_KEYS, "LoHa")
        return cls.read_lycoris(cfg, "LoHa")


class LoKrConfig(LycorisConfig):
    """LoKr: the update is a Kronecker product ``s * kron(W1, W2)`` of a small and a large factor,
    the large one (and with ``decompose_both`` the small one) itself rank-``r`` when that is smaller."""

    peft_type: ClassVar[str] = "LOKR"

    name: Literal["lokr"] = "lokr"
    decompose_both: bool = Field(False, description="factor the small Kronecker factor too")
    decompose_factor: int = Field(
        -1,
        description="the small factor's size when it divides the dimension (-1: the divisor nearest the square root)",
    )
    rank_dropout_scale: bool = Field(False, description="rescale the rows kept by rank_dropout")

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        return {
            **self.lycoris_fields(injection),
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "rank_dropout_scale": self.rank_dropout_scale,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> LoKrConfig:
        refuse_unknown(
            cfg,
            cls.TARGET_KEYS | cls.LYCORIS_KEYS | {"decompose_both", "decompose_factor", "rank_dropout_scale"},
            "LoKr",
        )
        return cls.read_lycoris(
            cfg,
            "LoKr",
            decompose_both=bool(cfg.get("decompose_both", False)),
            decompose_factor=int(cfg.get("decompose_factor", -1)),
            rank_dropout_scale=bool(cfg.get("rank_dropout_scale", False)),
        )


class AdaLoraConfig(TargetedConfig):
    """AdaLoRA: an SVD-shaped update ``B diag(E) A`` per layer whose singular values ``E`` are
    pruned during training by importance, from ``init_r`` per layer to ``target_r`` on average.

    The budget schedule (peft's): ``tinit`` steps at full rank, then the budget falls as a cubic
    to ``target_r`` at step ``total_step - tfinal``, re-allocated every ``deltaT`` steps; the last
    ``tfinal`` steps keep the final ranks. The scale is ``alpha / init_r``.
    """

    peft_type: ClassVar[str] = "ADALORA"

    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="rank of every layer at the start")
    target_r: int = Field(8, gt=0, description="average rank kept at the end")
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha / init_r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the update's input")
    total_step: int | None = Field(
        None, description="the run's optimizer steps: the budget schedule's length (required)"
    )
    tinit: int = Field(0, ge=0, description="steps at full rank before pruning starts")
    tfinal: int = Field(0, ge=0, description="steps at the final ranks at the end")
    deltaT: int = Field(1, gt=0, description="steps between two re-allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="smoothing of the importance scores")
    beta2: float = Field(0.85, gt=0, lt=1, description="smoothing of their uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the penalty keeping A and B orthogonal")
    rank_pattern: dict[str, list[bool]] | None = Field(
        None, description="the ranks kept per layer (written by training; read from adapter files)"
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> AdaLoraConfig:
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(
                "AdaLoRA needs a step budget: set method.total_step to the run's optimizer steps "
                "(epochs x batches per epoch / grad_accum, or train.max_steps)"
            )
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} is larger than init_r {self.init_r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit {self.tinit} and tfinal {self.tfinal} leave no pruning phase in total_step {self.total_step}"
            )
        return self

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        conv1d = any(getattr(model.get_submodule(n), "fan_in_fan_out", False) for n in injection.replaced)
        return {
            "peft_type": self.peft_type,
            **self.target_fields(injection),
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "total_step": self.total_step,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "rank_pattern": self.kept_ranks(injection, model),
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "init_lora_weights": True,
            "r": 8,
        }

    @staticmethod
    def kept_ranks(injection: Any, model: nn.Module) -> dict[str, list[bool]] | None:
        """peft's ``rank_pattern`` (``<layer>.lora_E`` -> kept flags) from the layers' rank masks,
        or None before any pruning."""
        masks = {name: model.get_submodule(name).updates[DEFAULT_ADAPTER].rank_mask for name in injection.replaced}
        if all(bool(m.all()) for m in masks.values()):
            return None
        return {f"{name}.lora_E": m.tolist() for name, m in masks.items()}

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> AdaLoraConfig:
        # r, use_rslora, alpha_pattern, lora_bias and the init are LoraConfig fields peft's AdaLoRA never reads
        ignored = {"r", "use_rslora", "alpha_pattern", "lora_bias", "init_lora_weights"}
        refuse_unknown(
            cfg,
            cls.TARGET_KEYS
            | ignored
            | {
                "init_r",
                "target_r",
                "lora_alpha",
                "lora_dropout",
                "total_step",
                "tinit",
                "tfinal",
                "deltaT",
                "beta1",
                "beta2",
                "orth_reg_weight",
                "rank_pattern",
            },
            "AdaLoRA",
        )
        return validated(
            cls,
            "AdaLoRA",
            init_r=cfg.get("init_r", 12),
            target_r=cfg.get("target_r", 8),
            alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0),
            total_step=cfg.get("total_step"),
            tinit=cfg.get("tinit", 0),
            tfinal=cfg.get("tfinal", 0),
            deltaT=cfg.get("deltaT", 1),
            beta1=cfg.get("beta1", 0.85),
            beta2=cfg.get("beta2", 0.85),
            orth_reg_weight=cfg.get("orth_reg_weight", 0.5),
            rank_pattern=cfg.get("rank_pattern"),
            **cls.read_targets(cfg),
        )


class PTuningConfig(PromptLearningConfig):
    """P-tuning: virtual tokens produced by a small trained encoder (an MLP, or a bidirectional
    LSTM and an MLP) from trained embeddings. Files hold the encoder's output, so a loaded
    adapter is its prompts as they are (``encoder: none``)."""

    peft_type: ClassVar[str] = "P_TUNING"

    name: Literal["ptuning"] = "ptuning"
    encoder: Literal["mlp", "lstm", "none"] = Field(
        "mlp", description="what turns the embeddings into prompts (none: the embeddings are the prompts)"
    )
    encoder_hidden_size: int | None = Field(None, gt=0, description="the encoder's width; default: the hidden size")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (the MLP always has 3 linear layers)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers")

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            **module_fields(model),  # token_dim, encoder_hidden_size
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "encoder_reparameterization_type": "LSTM" if self.encoder == "lstm" else "MLP",
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> PTuningConfig:
        cls.check_peft(
            cfg,
            {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
            "P-tuning",
        )
        kind = cfg.get("encoder_reparameterization_type", "MLP")
        if kind not in ("MLP", "LSTM"):
            refuse_option("P-tuning", "encoder_reparameterization_type", kind)
        # peft saves the encoder's output as prompt_embeddings: loading needs no encoder
        return validated(
            cls,
            "P-tuning",
            num_virtual_tokens=cfg["num_virtual_tokens"],
            encoder="none",
            encoder_hidden_size=cfg.get("encoder_hidden_size"),
            modules_to_save=sorted(set(cfg.get("modules_to_save") or []), key=(cfg.get("modules_to_save") or []).index),
        )


class LNTuningConfig(MethodConfig):
    """LayerNorm tuning options (peft's ``LN_TUNING``): the normalization layers train, all else
    stays frozen."""

    peft_type: ClassVar[str] = "LN_TUNING"

    name: Literal["ln_tuning"] = "ln_tuning"
    target_modules: Targets | None = Field(
        None, description="normalization layers to tune (name suffixes or a regex); default: every one"
    )
    exclude_modules: Targets | None = None

    def to_peft(self, injection: Any, model: nn.Module) -> dict[str, Any]:
        # stored as the layers chosen, so peft's suffix matching selects exactly these
        return {
            "peft_type": self.peft_type,
            "target_modules": injection.replaced,
            "exclude_modules": None,
            "modules_to_save": injection.modules_to_save or None,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> LNTuningConfig:
        refuse_unknown(cfg, {"target_modules", "exclude_modules", "modules_to_save"}, "LN_TUNING")
        return validated(
            cls,
            "LN_TUNING",
            target_modules=sorted_targets(cfg.get("target_modules")),
            exclude_modules=sorted_targets(cfg.get("exclude_modules")),
            modules_to_save=list(cfg.get("modules_to_save") or []),
        )
