"""Numeric precision for inference (and the bf16 check training shares): fp32; bf16 autocast
where the hardware computes bf16 natively; int8 linear layers on the CPU; auto.

Why native only: without AVX512-BF16 or AMX, oneDNN still accepts bf16 but converts in software,
and a ViT-B-32 image batch ran 2.8x slower than fp32 on an AVX-512 Xeon without them (7.1 vs
19.8 images/s, 2 threads); with AVX512-BF16 it ran 1.93x faster (issue #19's measurement).
"""

from __future__ import annotations


import torch

from .cpu import cpu_flags
from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "int8", "auto")
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
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"precision int8: CPU only (fbgemm kernels), not {device.type}; use bf16 or fp32")
    return precision


def with_precision(model, precision: str):
    """`model` set up for a resolved `precision`: int8 gives a quantised copy, bf16 makes its
    encoders and captioner run under bf16 autocast (outputs float32), fp32 leaves it as is."""
    if precision == "int8":
        from .quantize import quantize_int8

        return quantize_int8(model)
    model.precision = precision
    return model
