"""OpenAI's ModifiedResNet image tower (open_clip's RN50 ... RN50x64): three stem convolutions
and an average pool, bottleneck stages whose strided blocks average-pool first (anti-aliasing),
and attention pooling: the mean of the final feature map queries every position.

Module names are open_clip's, so its state dicts map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .linear import Linear
from .tower import check_images
from .transformer import attend


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Multi-head attention over [mean, positions] of a feature map [B, C, H, W] + learned positions."""

    def __init__(self, spatial: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial ** 2 + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.c_proj = Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, all_queries: bool = False) -> torch.Tensor:
        """The mean's output [B, out_dim], or with `all_queries` every position's [B, 1 + HW, out_dim]
        (only the mean's query is computed otherwise: each query attends on its own)."""
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        H = self.heads
        q = self.q_proj(x if all_queries else x[:, :1])
        q, k, v = (t.reshape(B, -1, H, C // H).transpose(1, 2) for t in (q, self.k_proj(x), self.v_proj(x)))
        y = self.c_proj(attend(q, k, v).transpose(1, 2).reshape(B, -1, C))
        return y if all_queries else y[:, 0]


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.in_channels, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for i, blocks in enumerate(cfg.stages):
            planes = w * 2 ** i
            stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(cfg.image_size // 32, inplanes, cfg.heads, embed_dim)

    @staticmethod
    def token_shape(cfg: VisionConfig, embed_dim: int) -> tuple[int, int]:
        """(count, width) of `tokens`: every position of the attention pool."""
        return (cfg.image_size // 32) ** 2 + 1, embed_dim

    @torch.no_grad()
    def init_weights(self) -> None:  # open_clip's: pool projections ~ N(0, 1/dim), each stage's last BN at 0
        std = self.attnpool.c_proj.in_features ** -0.5
        for layer in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(layer.weight, std=std)
        for name, p in self.named_parameters():
            if name.startswith("layer") and name.endswith("bn3.weight"):
                nn.init.zeros_(p)

    def train(self, mode: bool = True) -> "ModifiedResNet":
        """A frozen tower keeps its batch-norm statistics too (eval mode while no parameter trains)."""
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        check_images(cfg, images)
        x = images.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        for i in range(len(cfg.stages)):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What a caption decoder reads: the attention pool's output at every position [B, 1 + HW, embed_dim]."""
        return self.attnpool(self._features(images), all_queries=True)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, embed_dim], `tokens`) from one pass."""
        tokens = self.tokens(images)
        return tokens[:, 0], tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], normalised -> pooled features [B, embed_dim]."""
        return self.attnpool(self._features(images))
