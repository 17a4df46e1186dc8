"""Prompt and prefix adapters under names, on a base that may hold LoRA and IA3 ones too.

A prompt adapter puts its virtual tokens in front of the input embeddings, a prefix adapter its
keys and values in front of every self-attention layer's: the same computation as the
single-adapter methods (:mod:`.prompt`, :mod:`.prefix`), switched by the model's
:class:`~.base.Routing` instead of always on. One forward pre-hook on the model looks at which
adapter the pass uses and adds that adapter's tokens, or none.

Such an adapter changes the sequence every layer sees, so its rows cannot share a forward pass
with rows of another adapter; :meth:`~.named.NamedAdapters.forward_rows` runs one pass for the
rows of all LoRA/IA3 adapters and the base (gathered as usual) and one per prompt or prefix
adapter present.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError
from .configs import PROMPT_KEY, MethodConfig, PrefixTuningConfig, PromptLearningConfig, PromptTuningConfig
from .prefix import attention_layers, kv_shape, route_prefixes, use_prefix_attention
from .prompt import as_kwargs, prepend_prompt
from .tuner_configs import PTuningConfig

TOKEN_METHODS = (PromptTuningConfig, PrefixTuningConfig, PTuningConfig)


class TokenAdapters:
    """The virtual tokens of the named prompt adapters and the key/value prefixes of the named
    prefix adapters on one model; :func:`~.prefix.add_prefix` reads ``current`` and ``seen``.

    Attributes:
        prompts: name -> ``(n, hidden)`` virtual-token embeddings.
        prefixes: name -> ``(layers, 2, kv_heads, P, head_dim)`` keys and values.
    """

    def __init__(self, model: nn.Module, routing: Any):
        self.model = model
        self.routing = routing
        self.prompts: dict[str, torch.Tensor] = {}
        self.prefixes: dict[str, torch.Tensor] = {}
        self.current: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen = None
        self._layers: list[nn.Module] | None = None
        self._attention: str | None = None  # the model's own attention implementation, while prefixes are on
        self._hook: Any = None

    def __contains__(self, name: object) -> bool:
        return name in self.prompts or name in self.prefixes

    def check(self, method: MethodConfig, state: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        """The adapter's tensor in the form this model uses, checked against the model.

        Raises:
            PeftkitError: the tensor is missing or does not fit this base.
        """
        fix = "load it onto the base model it was trained with (--model)"
        assert isinstance(method, PromptLearningConfig)
        flat = state.get(PROMPT_KEY)
        if flat is None or flat.ndim != 2 or flat.shape[0] != method.num_virtual_tokens:
            raise PeftkitError(
                f"the adapter holds no {method.num_virtual_tokens} x D '{PROMPT_KEY}' tensor",
                where,
                "save the adapter again",
            )
        embeddings = self.model.get_input_embeddings()
        ref = embeddings.weight
        if not isinstance(method, PrefixTuningConfig):  # prompt tuning and P-tuning: the virtual tokens
            if flat.shape[1] != ref.shape[1]:
                raise PeftkitError(
                    f"the adapter's virtual tokens are {flat.shape[1]} wide, this model's embeddings {ref.shape[1]}",
                    where,
                    fix,
                )
            return flat.to(ref.device, ref.dtype)
        layers = self._layers if self._layers is not None else attention_layers(self.model)
        kv_heads, head_dim = kv_shape(self.model)
        if flat.shape[1] != len(layers) * 2 * kv_heads * head_dim:
            raise PeftkitError(
                f"the adapter's prefixes are {flat.shape[1]} wide, this model needs "
                f"{len(layers)} layers x 2 x {kv_heads} heads x {head_dim}",
                where,
                fix,
            )
        self._layers = layers
        kv = flat.view(flat.shape[0], len(layers), 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
        return kv.to(ref.device, ref.dtype)

    def add(self, name: str, method: MethodConfig, tensor: torch.Tensor) -> None:
        """Put a checked tensor (:meth:`check`) on the model under ``name``."""
        if self._hook is None:
            self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if not isinstance(method, PrefixTuningConfig):
            self.prompts[name] = tensor
            return
        if not self.prefixes:
            self._attention = self.model.config._attn_implementation
            use_prefix_attention(self.model, self, self._layers)
        self.prefixes[name] = tensor

    def remove(self, name: str) -> None:
        self.prompts.pop(name, None)
        if self.prefixes.pop(name, None) is not None and not self.prefixes:
            self.model.config._attn_implementation = self._attention
        if not self.prompts and not self.prefixes and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pass_adapter(self) -> str | None:
        """The adapter of every row of this forward pass (None: none, or only LoRA/IA3 rows)."""
        rows = self.routing.rows
        if rows is None:
            return next((n for n in self.routing.active if n in self), None)
        present = {self.routing.slots[s] for s in rows.unique().tolist()}
        return present.pop() if len(present) == 1 else None

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        name = self._pass_adapter()
        kwargs = as_kwargs(model, args, kwargs)
        if self.prefixes:  # every pass sets the prefixes it uses, none for other adapters' rows
            kwargs = route_prefixes(self, self.prefixes.get(name), self._layers, kwargs)
        if name in self.prompts:
            return prepend_prompt(self.prompts[name], model, (), kwargs)
        return (), kwargs
