"""Linear layers whose fp32 CPU matmuls run on oneDNN rather than the BLAS that F.linear calls.

Why: torch's fp32 CPU matmul goes to MKL, which does not use AVX-512 on AMD CPUs; oneDNN does.
On this project's AMD EPYC (2 threads) a ViT-B-32 MLP layer's forward takes 44 ms on oneDNN
against 82 ms on MKL, and the input-gradient matmul 36 against 70. The weight gradient stays on
BLAS (BLAS reads transposed operands in place, oneDNN would need copies; measured no faster).
Results equal F.linear's up to fp32 rounding (accumulation order). On Intel CPUs MKL does use
AVX-512 and is the faster one (an Intel Xeon, 2 threads, 12544 x 768 -> 3072: MKL 329 ms, oneDNN
371; benchmarks/README.md), so there BLAS is kept. CLIPPER_LINEAR=onednn|blas|auto (default auto).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import cpuinfo


def _onednn_chosen() -> bool:
    choice = os.environ.get("CLIPPER_LINEAR", "auto").lower()
    if choice == "blas" or (choice == "auto" and cpuinfo("vendor_id") == "GenuineIntel"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_chosen()
_DNN_DTYPES = (torch.float32, torch.bfloat16)
# A handful of rows (one decode step) costs oneDNN ~17 us of call overhead against ~9-12 for BLAS
# (8 x 128 -> 384/512); from ~32 rows, or a wide output (a vocabulary head), oneDNN is faster.
_FEW_ROWS = 16
_WIDE_OUT = 1024  # outputs above this go to oneDNN whatever the rows (measured 30 vs 38 us at 8 x 128 -> 1630)


def _dnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [None], "")


def _cpu_bf16_autocast(device: torch.device) -> bool:
    return device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _dnn(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on oneDNN for fp32 CPU tensors, and for bf16 under CPU bf16 autocast (which does not
    know the oneDNN op, so the casts are made here)."""
    # torch.compile and torch.export (ONNX) lower F.linear themselves; the raw oneDNN op breaks them,
    # and a branch on the row count would fix a dynamic batch size in the graph
    if torch.compiler.is_compiling() or (x.numel() < _FEW_ROWS * x.shape[-1] and weight.shape[0] <= _WIDE_OUT):
        return F.linear(x, weight, bias)
    cpu = x.device.type == "cpu"
    if _cpu_bf16_autocast(x.device):
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    if ONEDNN and cpu and x.dtype == weight.dtype and x.dtype in _DNN_DTYPES and x.numel():
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return _dnn(x, weight, bias)
    return F.linear(x, weight, bias)


# A decode step feeds a handful of rows through every weight of the decoder once. There oneDNN on a
# weight reordered into its own blocked layout streams 2-4x faster than BLAS or the plain oneDNN
# call (8 rows, 2 threads, weights from memory: 512 -> 2048 in 141 vs 620 / 337 us, a 49,408-way
# head 2.8 vs 18 / 6.5 ms; benchmarks/README.md, "CoCa captioning"). The reorder itself is slow
# (2-10 ms a 512 x 2048 weight), so each packed copy is kept, beside the weight, until the weight
# changes. Below 2^17 weights the packed call's ~25 us floor loses to addmm (8 x 128 -> 512: 29 vs 21).
PACK = ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACK_MIN = 1 << 17
# id(weight) -> {(rows, transposed, dtype): (weight version, packed copy)}, dropped with the weight
# (not a WeakKeyDictionary: it compares keys with ==, which tensors answer elementwise)
_PACKED: dict[int, dict] = {}


def _packed(weight: torch.Tensor, rows: tuple[int, int] | None, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The oneDNN-reordered copy of `weight` (its transpose, rows `rows` of it) in `dtype`, made once
    per version of the weight (an in-place load or optimiser step makes a new one)."""
    entries = _PACKED.get(id(weight))
    if entries is None:
        entries = _PACKED[id(weight)] = {}
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    key = (rows, transposed, dtype)
    version, packed = entries.get(key, (None, None))
    if version != weight._version:
        w = weight.detach().t() if transposed else weight.detach()
        w = w if rows is None else w[rows[0]:rows[1]]
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous())
        entries[key] = (weight._version, packed)
    return packed


def bound_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                 transposed: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear(x, w, bias)` for 2-D x, as a function of x alone, for a hot loop (a decode step), where
    w is `weight` (`weight.t()` when `transposed`: an [in, out] matrix), only rows `rows` of it when
    given (and of `bias`). On oneDNN CPUs a large w is reordered once (`_packed`; in bf16 under CPU bf16
    autocast, which is looked at here, once); elsewhere the addmm that F.linear makes is called on a
    transpose taken once: the same numbers, without F.linear's dispatch (~1 us of a ~12 us call).
    The weights are those at binding time: bind again after loading new ones."""
    w = weight.t() if transposed else weight
    if rows is not None:
        w, bias = w[rows[0]:rows[1]], None if bias is None else bias[rows[0]:rows[1]]
    dtype = torch.bfloat16 if _cpu_bf16_autocast(weight.device) else weight.dtype
    if PACK and weight.device.type == "cpu" and dtype in _DNN_DTYPES and w.numel() >= _PACK_MIN \
            and not torch.compiler.is_compiling():
        packed = _packed(weight, rows, transposed, dtype)
        b = None if bias is None else bias.detach().to(dtype)
        return lambda x: _dnn(x.to(dtype), packed, b)
    if w.shape[0] > _WIDE_OUT:
        return lambda x: linear(x, w, bias)
    wt = w.t()
    if bias is None:
        return lambda x: torch.mm(x, wt) if x.shape[0] < _FEW_ROWS else linear(x, w)
    return lambda x: torch.addmm(bias, x, wt) if x.shape[0] < _FEW_ROWS else linear(x, w, bias)


def bound_layer(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer as a function of its 2-D input (`bound_linear`; other layers, int8: as they are)."""
    return bound_linear(layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer.forward


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
