"""ViT image encoder: patch embedding, class token, learned positions, pre/post norm, projection."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(w ** -0.5 * torch.randn(w))
        self.positional_embedding = nn.Parameter(w ** -0.5 * torch.randn(cfg.grid ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(w ** -0.5 * torch.randn(w, embed_dim))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images: expected [batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(images.shape)}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every output token, normalised: [B, 1 + grid^2, width] (class token first): the captioner's input."""
        return self.ln_post(self.transformer(self._embed(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], normalised -> pooled, projected features [B, embed_dim]."""
        cfg = self.cfg
        x = self._embed(images)
        if cfg.pool == "tok":
            # Only the class token's output is used: the last block runs its query and MLP on it alone.
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            pooled = self.ln_post(self.transformer(x, pool_index=index))
        else:
            pooled = self.ln_post(self.transformer(x))[:, 1:].mean(dim=1)
        return pooled @ self.proj
