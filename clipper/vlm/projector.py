"""Projectors: the image tower's features -> the language model's embedding width."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

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
