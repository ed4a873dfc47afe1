"""CPU inference in row chunks that keep every activation under ROW_CHUNK_BYTES.

Why: glibc's malloc serves an allocation over 32 MiB (the most its mmap threshold grows to) with
fresh pages from the kernel, each zeroed on first touch, and returns them on free. A ViT-B-32
batch of 64 images makes MLP activations of 39 MiB: in int8 that batch spent 0.53 s of its 1.08 s
in the kernel (270,000 page faults; AMD EPYC, 2 threads). Smaller allocations are reused from the
heap. The widest activation of one row is measured, not derived from a config, so that every
tower (ours, timm's, transformers') is covered: one forward of one row per input shape, with a
hook on every module (benchmarks/README.md, "Inference anywhere").
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

ROW_CHUNK_BYTES = 16 << 20  # benchmarks/row_chunks.py: no faults at 8-16 MiB; some at 24 (chunks of 40 images)

_widest: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def chunked(tower: nn.Module, x: torch.Tensor, method: str = "forward") -> torch.Tensor:
    """tower(x) (or tower.`method`(x), e.g. "tokens"), computed over row chunks of x when that keeps
    its activations under the budget: CPU inference only (training keeps every activation for
    backward anyway; GPUs cache memory)."""
    run = _entry(tower, method)
    if (torch.is_grad_enabled() or x.device.type != "cpu" or len(x) < 2 or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()):
        return run(x)
    parts = -(-len(x) * _row_bytes(tower, x, method) // ROW_CHUNK_BYTES)
    if parts < 2:
        return run(x)
    return torch.cat([run(part) for part in x.tensor_split(min(parts, len(x)))])  # even parts


def _row_bytes(tower: nn.Module, x: torch.Tensor, method: str = "forward") -> int:
    """Bytes of the largest tensor a module of `tower` makes for one row of x, measured on the row
    that reaches furthest (token ids: the one with the last nonzero id, as towers cut the padding)."""
    row, reach = 0, None
    if not x.is_floating_point():
        last = ((x != 0) * torch.arange(1, x.shape[1] + 1, device=x.device)).amax(1)
        row, reach = int(last.argmax()), int(last.max())
    key = (method, tuple(x.shape[1:]), x.dtype, reach, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    measured = _widest.setdefault(tower, {})
    if key not in measured:
        widest = [1]

        def track(module, args, output):
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    widest[0] = max(widest[0], t.numel() * t.element_size())

        handles = [m.register_forward_hook(track) for m in tower.modules()]
        try:
            _entry(tower, method)(x[row:row + 1])
        finally:
            for h in handles:
                h.remove()
        measured[key] = widest[0]
    return measured[key]


def _entry(tower: nn.Module, method: str):
    """What runs the tower: the module itself for forward (its own hooks run), else the method."""
    return tower if method == "forward" else getattr(tower, method)
