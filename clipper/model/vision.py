"""ViT image encoder: patch embedding, class token, learned positions, pre/post norm, projection;
pooled by the class token, the mean of the patch tokens, or CoCa's attentional pooler."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .linear import Linear
from .resnet import ModifiedResNet
from .transformer import Transformer, attend, init_blocks


class AttentionalPooler(nn.Module):
    """Learned queries [n, dim] attend to the tower's tokens [B, L, width] (open_clip's CoCa
    pooler: one multi-head cross-attention, its k and v projections packed as one layer)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.q = Linear(dim, dim)
        self.kv = Linear(context_dim, 2 * dim)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """x [B, L, width] -> [B, n, dim] for the first `queries` queries (all by default: each
        query attends on its own, so fewer is exact for those it keeps)."""
        B, L, _ = x.shape
        H, dim = self.heads, self.query.shape[1]
        q = self.q(self.ln_q(self.query[:queries]))
        n = q.shape[0]
        q = q.view(n, H, dim // H).transpose(0, 1).expand(B, H, n, dim // H)
        k, v = self.kv(self.ln_k(x)).view(B, L, 2, H, dim // H).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(attend(q, k, v).transpose(1, 2).reshape(B, n, dim))


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
        self.attn_pool = None
        if cfg.pool == "attn":
            self.attn_pool = AttentionalPooler(embed_dim, w, cfg.attn_pool_heads, cfg.attn_pool_queries)
        pool_width = embed_dim if self.attn_pool is not None else w
        self.ln_post = nn.LayerNorm(pool_width)
        self.proj = nn.Parameter(pool_width ** -0.5 * torch.randn(pool_width, embed_dim))

    @staticmethod
    def token_shape(cfg: VisionConfig, embed_dim: int) -> tuple[int, int]:
        """(count, width) of `tokens`."""
        if cfg.pool == "attn":
            return cfg.attn_pool_queries - 1, embed_dim
        return cfg.grid ** 2 + 1, cfg.width

    def init_weights(self) -> None:
        init_blocks(self.transformer.blocks)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images: expected [batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(images.shape)}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))

    def _pooled_and_tokens(self, x: torch.Tensor, queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's outputs -> (the row the embedding projects [B, w], the caption tokens)."""
        if self.attn_pool is not None:  # open_clip's CoCa: pooler, then ln_post; query 0 is the embedding
            x = self.ln_post(self.attn_pool(x, queries))
            return x[:, 0], x[:, 1:]
        x = self.ln_post(x)
        return (x[:, 0] if self.cfg.pool == "tok" else x[:, 1:].mean(dim=1)), x

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What a caption decoder reads: every output token, normalised [B, 1 + grid^2, width]
        (class token first), or with the attentional pooler its caption queries [B, n - 1, embed_dim]."""
        return self.encode(images)[1]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected features [B, embed_dim], `tokens`) from one pass."""
        pooled, tokens = self._pooled_and_tokens(self.transformer(self._embed(images)))
        return pooled @ self.proj, tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], normalised -> pooled, projected features [B, embed_dim]."""
        x = self._embed(images)
        if self.cfg.pool == "tok":
            # Only the class token's output is used: the last block runs its query and MLP on it alone.
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.ln_post(self.transformer(x, pool_index=index)) @ self.proj
        return self._pooled_and_tokens(self.transformer(x), queries=1)[0] @ self.proj


VISION_TOWERS = {"vit": VisionTransformer, "resnet": ModifiedResNet}  # VisionConfig.kind -> the tower
