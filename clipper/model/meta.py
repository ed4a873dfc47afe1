"""Building models on the meta device (shapes only: weights are loaded next) without the cost of
initialising weights that do not exist."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
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


def build(make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` (a timm or transformers model) as usual, or, when the default device is meta (weights
    are loaded next), without running its weight init; buffers that it computes when it is built and
    does not save (EVA's and PE's rotary tables, position ids) would stay empty on the meta device:
    then they are made on the CPU while the parameters stay on the meta device."""
    if torch.get_default_device().type != "meta":
        return make()
    with SkipMetaInit():
        module = make()
    saved = set(module.state_dict())
    if all(name in saved for name, _ in module.named_buffers()):
        return module
    try:
        with torch.device("cpu"), _parameters_on_meta():  # the init runs on the meta parameters
            return make()
    except (RuntimeError, NotImplementedError):  # an init that computes with both (MCi's stem): for real
        with torch.device("cpu"):
            return make()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
