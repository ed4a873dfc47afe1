"""Building models on the meta device (shapes only: weights are loaded next) without the cost of
initialising weights that do not exist."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class SkipMetaInit(TorchFunctionMode):
    """In-place ops on meta tensors do nothing, so they are skipped: a model's weight init, run on
    the meta device, costs Python decompositions per op. Measured here: timm's ConvNeXt-B builds in
    0.08 s instead of 0.38 (`clipper presets` builds ~100 models to count their parameters)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))
