"""A quantized frozen base (QLoRA style): 8-bit or 4-bit linear layers from bitsandbytes.

Only the base's ``nn.Linear`` layers are quantized; the method's own parameters, the saved
modules (task head), embeddings, norms and the LM head stay in full precision. A method
then wraps a quantized linear as it wraps a plain one (``bnb.nn.Linear4bit`` and
``Linear8bitLt`` are ``nn.Linear`` subclasses). bitsandbytes 0.50 runs both forward and
backward on CPU as well as on CUDA. GPT-2's ``Conv1D`` layers are left unquantized.

On CPU a 4-bit layer computes by dequantizing its weight and multiplying; bitsandbytes
allocates a fresh full-precision weight for that on every call, forward and backward, and
those short-lived megabytes fragment the heap until the process holds far more than the
model needs. :class:`_CPULinear4bit` dequantizes into one reused buffer per thread instead.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import QuantizationConfig
from .errors import PeftkitError
from .inject import is_under, output_embedding_name, replace_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bitsandbytes looks for an optional kernel package on every 4-bit CPU call and logs a warning
# when it is missing; peftkit's own dequantizing kernel does that work (_CPULinear4bit)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or a one-line error naming the package to install."""
    try:
        import bitsandbytes
    except Exception as exc:  # not installed, or its native library failed to load
        raise PeftkitError(
            f"quantization needs bitsandbytes ({type(exc).__name__}: {str(exc)[:80]})",
            "quantization",
            "pip install bitsandbytes==0.50.2, or remove the quantization block",
        ) from None
    return bitsandbytes


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did: layers quantized and their weight bytes before and after."""

    bits: int
    layers: int
    bytes_before: int
    bytes_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "layers": self.layers,
            "base_linear_bytes_before": self.bytes_before,
            "base_linear_bytes_after": self.bytes_after,
            "ratio": round(self.bytes_after / max(1, self.bytes_before), 4),
        }

    def line(self) -> str:
        return (
            f"quantized {self.layers} linear layers to {self.bits} bits: base linear weights "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({100 * self.bytes_after / max(1, self.bytes_before):.1f}%)"
        )


def is_quantized(module: nn.Module) -> bool:
    return any(c.__name__ in ("Linear4bit", "Linear8bitLt") for c in type(module).__mro__)


def is_4bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" for c in type(module).__mro__)


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a quantized layer's weight occupies, scales and statistics included."""
    weight = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    state = getattr(weight, "quant_state", None)
    while state is not None:  # 4-bit: absmax per block, and with double quantization its own state
        absmax = getattr(state, "absmax", None)
        total += absmax.numel() * absmax.element_size() if absmax is not None else 0
        state = getattr(state, "state2", None)
    scb = _int8_scales(layer)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


def _int8_scales(layer: nn.Module) -> torch.Tensor | None:
    scb = getattr(layer.weight, "SCB", None)
    if scb is None and hasattr(layer, "state"):
        scb = getattr(layer.state, "SCB", None)
    return scb


def quantize_model(model: nn.Module, cfg: QuantizationConfig, skip: list[str] = ()) -> QuantizationReport:
    """Replace the frozen base's ``nn.Linear`` layers of ``model`` by quantized ones, in place.

    Args:
        model: a full-precision model (before a method is applied).
        cfg: the quantization options.
        skip: module names whose subtrees stay in full precision (the saved task head).
    """
    bnb = require_bitsandbytes()
    # 8-bit layers log, on every call, that float32 inputs are cast to float16: expected here
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    skip = list(skip)
    head = output_embedding_name(model)
    if head:
        skip.append(head)
    names = [n for n, m in model.named_modules() if n and type(m) is nn.Linear and not is_under(n, skip)]
    before = after = 0
    for name in names:
        layer = model.get_submodule(name)
        before += layer.weight.numel() * layer.weight.element_size()
        quantized = _quantized_linear(bnb, layer, cfg)
        replace_module(model, name, quantized)
        after += quantized_bytes(quantized)
    prepare_for_kbit_training(model)
    _own_storage(model)
    return QuantizationReport(cfg.bits, len(names), before, after)


def _own_storage(model: nn.Module) -> None:
    """Copy the remaining full-precision tensors out of the checkpoint file's memory map.

    ``from_pretrained`` maps the safetensors file; quantizing reads every linear weight,
    and while any tensor (the embeddings) still points into the map, all pages read stay
    resident and count against the process. Owning copies let the map, and them, go.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not is_quantized(module) or name == "bias":
                    p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                if b is not None and not is_quantized(module):
                    module._buffers[name] = b.clone()


def _quantized_linear(bnb: Any, layer: nn.Linear, cfg: QuantizationConfig) -> nn.Module:
    device = layer.weight.device
    weight = layer.weight.data.to("cpu", torch.float32).contiguous()
    has_bias = layer.bias is not None
    if cfg.bits == 4:
        q = _cpu_linear4bit_class(bnb)(
            layer.in_features,
            layer.out_features,
            bias=has_bias,
            compute_dtype=DTYPES[cfg.compute_dtype],
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=cfg.quant_type, compress_statistics=cfg.double_quant, module=q
        )
    else:
        q = bnb.nn.Linear8bitLt(
            layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(layer.bias.data.to("cpu").clone(), requires_grad=False)
    return q.to(device)  # moving to a device is what quantizes


_CPU_LINEAR4BIT: type | None = None
_buffers = threading.local()


def _cpu_linear4bit_class(bnb: Any) -> type:
    """``bnb.nn.Linear4bit`` whose CPU forward and backward dequantize into a reused buffer."""
    global _CPU_LINEAR4BIT
    if _CPU_LINEAR4BIT is None:

        class Linear4bit(bnb.nn.Linear4bit):  # same name: peft, and readers of the layer, see a Linear4bit
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                state = getattr(self.weight, "quant_state", None)
                if self.weight.device.type != "cpu" or state is None or getattr(state, "packing_format_for_cpu", 0):
                    return super().forward(x)
                dtype = self.compute_dtype or x.dtype
                bias = None if self.bias is None else self.bias.to(dtype)
                return _Dequantized4bitLinear.apply(x.to(dtype), self.weight, bias).to(x.dtype)

        _CPU_LINEAR4BIT = Linear4bit
    return _CPU_LINEAR4BIT


class _Dequantized4bitLinear(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` dequantized into the shared buffer, again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a parameter: keeping it costs nothing
        ctx.bias_grad = bias is not None and bias.requires_grad
        return F.linear(x, _dequantize_shared(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_x = grad @ _dequantize_shared(ctx.weight, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_bias


def _dequantize_shared(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` weight in ``dtype``, written over this thread's buffer (valid until the next call)."""
    import bitsandbytes as bnb

    state = weight.quant_state  # type: ignore[attr-defined]  # bitsandbytes' Params4bit
    n, k = state.shape
    store = _buffers.__dict__
    buf = store.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = store[dtype] = torch.empty(n * k, dtype=dtype)
    out = buf[: n * k].view(n, k)
    kernel = _native_dequantizer(state, dtype, k)
    if kernel is None:  # no native kernel for this case: bitsandbytes' own (allocating) path
        return out.copy_(bnb.functional.dequantize_4bit(weight.data, state))
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float().contiguous()
    packed = weight.data.view(torch.uint8).contiguous()
    kernel(
        ctypes.c_void_p(packed.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(n),
        ctypes.c_longlong(k),
    )
    return out


def _native_dequantizer(state: Any, dtype: torch.dtype, k: int) -> Any:
    """bitsandbytes' CPU dequantization kernel that writes into a given buffer, when it has one
    for this case (the same kernel its CPU backend calls, with the same conditions)."""
    if k % 2 or state.blocksize >= 2048:
        return None
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        return None
    try:
        from bitsandbytes.cextension import lib

        return getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{names[dtype]}")
    except Exception:  # another bitsandbytes build: fall back to its public function
        return None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision ``(out, in)`` weight a quantized layer computes with."""
    import bitsandbytes as bnb

    weight = layer.weight
    if is_4bit(layer):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * _int8_scales(layer).float().unsqueeze(1) / 127


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized linear (wrapped ones included) by an ``nn.Linear`` of ``dtype``."""
    count = 0
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            plain = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=dtype,
            )
            with torch.no_grad():
                plain.weight.copy_(dequantized_weight(module))
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            plain.requires_grad_(False)
            replace_module(model, name, plain)
            count += 1
    return count


def prepare_for_kbit_training(model: nn.Module) -> None:
    """What QLoRA does before training on a quantized base: norms in float32. (Input
    gradients, which gradient checkpointing needs, are switched on with it by the trainer.)"""
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
