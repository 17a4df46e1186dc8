"""Which precision a training run multiplies in."""

from __future__ import annotations

import platform


def native_bf16() -> bool:
    """Whether this process's device multiplies bf16 matrices in hardware: a CUDA card with
    bf16, or a CPU that oneDNN runs bf16 kernels on (AVX-512 BF16, AMX). Without that, bf16
    matrix multiplies are emulated and far slower than float32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # on x86, oneDNN's own check also says yes on plain AVX-512 CPUs, where it emulates bf16
    # (far slower than float32: bench/speed.py's matmul probe shows it), so ask for the
    # instructions themselves
    x86 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if x86 is not None and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(x86() or torch.cpu._is_amx_tile_supported())
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(setting: str) -> str:
    """``train.mixed_precision`` as the run uses it: ``auto`` becomes ``bf16`` on hardware with
    native bf16 and ``no`` elsewhere; the explicit settings stay as they are."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16() else "no"


def compute_dtype(precision: str):
    """The dtype a run's products are taken in: autocast's for ``bf16`` and ``fp16``, else float32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
