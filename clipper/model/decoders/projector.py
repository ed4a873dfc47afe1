"""Projectors: the image tower's features -> the language model's embedding width."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError

ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_new": lambda: nn.GELU("tanh"),
               "gelu_pytorch_tanh": lambda: nn.GELU("tanh"), "quick_gelu": None, "silu": lambda: nn.SiLU(),
               "relu": lambda: nn.ReLU()}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLPProjector(nn.Module):
    """LLaVA's multi_modal_projector: linear_1, activation, linear_2 (mlp2x_gelu)."""

    def __init__(self, in_width: int, width: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ConfigError(f"projector_hidden_act {act!r}: one of {', '.join(ACTIVATIONS)}")
        self.linear_1 = nn.Linear(in_width, width, bias=bias)
        self.act = QuickGELU() if act == "quick_gelu" else ACTIVATIONS[act]()
        self.linear_2 = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LinearProjector(nn.Module):
    """Idefics3's connector: one linear map, no bias (modality_projection.proj)."""

    def __init__(self, in_width: int, width: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(in_width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, g*g, D] tokens of a g x g grid -> [B, (g/f)^2, f*f*D]: each f x f block of neighbours
    in one token, its rows in order, each row's tokens in order (Idefics3's pixel shuffle)."""
    if factor == 1:
        return x
    b, n, d = x.shape
    g = math.isqrt(n)
    if g * g != n or g % factor:
        raise ConfigError(f"pixel shuffle: {n} tokens are not a square grid divisible by {factor}")
    s = g // factor
    return x.reshape(b, s, factor, s, factor, d).permute(0, 1, 3, 2, 4, 5).reshape(b, s * s, factor * factor * d)
