"""Numeric precision for inference (and the bf16 check training shares): fp32; bf16 autocast
where the hardware computes bf16 natively; int8 linear layers on the CPU; auto.

Why native only: without AVX512-BF16 or AMX, oneDNN still accepts bf16 but converts in software,
and a ViT-B-32 image batch ran 2.8x slower than fp32 on an AVX-512 Xeon without them (7.1 vs
19.8 images/s, 2 threads); with AVX512-BF16 it ran 1.93x faster (issue #19's measurement).
"""

from __future__ import annotations

import contextlib

import torch

from .cpu import cpu_flags
from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "int8", "auto")
CPU_ONLY = ("int8",)  # fbgemm's int8 kernels
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(device: torch.device | str) -> bool:
    """bf16 is computed natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` made concrete for `device`: auto is bf16 where it is native, else fp32 (int8 is
    never chosen for the user: its embeddings move, cosine ~0.999); bf16 where it is not native
    and int8 off the CPU are refused with the reason."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 or AMX)"
        raise ConfigError(f"precision bf16: {where} has no native bf16, and emulated bf16 runs slower than "
                          "fp32; use fp32, int8 (CPU) or auto")
    if precision in CPU_ONLY and device.type != "cpu":
        raise ConfigError(f"precision {precision}: CPU only (fbgemm kernels), not {device.type}; use bf16 or fp32")
    return precision


def inference_device(requested: str | None, precision: str, onnx: bool = False, local_rank: int = 0) -> str:
    """--device: auto (or None) is this process's GPU (LOCAL_RANK under torchrun) when there is one
    and the model can use it (not a CPU-only precision, not ONNX graphs), else the CPU."""
    if requested not in (None, "auto"):
        return requested
    if precision in CPU_ONLY or onnx or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank}"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The one autocast rule, for training and inference: bf16 autocast on `device` when
    `precision` is bf16 and the device computes bf16 natively, else nothing."""
    if precision == "bf16" and native_bf16(device):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


