"""ViT image encoder: patch embedding, class token (or none), learned positions, pre/post norm,
projection (or none); pooled by the class token, the mean of the patch tokens, CoCa's attentional
pooler, or SigLIP's attention-pooling head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .linear import Linear
from .resnet import ModifiedResNet
from .timm_tower import TimmTower
from .tower import check_images
from .transformer import MLP, Transformer, attend, init_blocks


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


class MAPHead(nn.Module):
    """SigLIP's multihead attention pooling (timm's AttentionPoolLatent, one latent query): the query
    attends to the normalised tokens, then a residual MLP on its output [B, width]."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = Linear(width, width)
        self.kv = Linear(width, 2 * width)
        self.proj = Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = self.heads
        q = self.q(self.latent.reshape(1, C)).view(1, H, 1, C // H).expand(B, H, 1, C // H)
        k, v = self.kv(x).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        y = self.proj(attend(q, k, v).reshape(B, C))
        return y + self.mlp(self.norm(y))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(w ** -0.5 * torch.randn(w)) if cfg.class_token else None
        self.positional_embedding = nn.Parameter(w ** -0.5 * torch.randn(cfg.grid ** 2 + cfg.class_token, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        act = "quick_gelu" if quick_gelu else cfg.act
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, act, cfg.norm_eps)
        self.attn_pool = None
        if cfg.pool == "attn":
            self.attn_pool = AttentionalPooler(embed_dim, w, cfg.attn_pool_heads, cfg.attn_pool_queries)
        self.map_pool = MAPHead(w, cfg.attn_pool_heads, int(w * cfg.mlp_ratio), act, cfg.norm_eps) \
            if cfg.pool == "map" else None
        pool_width = embed_dim if self.attn_pool is not None else w
        self.ln_post = nn.LayerNorm(pool_width, eps=cfg.norm_eps)
        self.proj = nn.Parameter(pool_width ** -0.5 * torch.randn(pool_width, embed_dim)) if cfg.projection else None

    @staticmethod
    def token_shape(cfg: VisionConfig, embed_dim: int) -> tuple[int, int]:
        """(count, width) of `tokens`."""
        if cfg.pool == "attn":
            return cfg.attn_pool_queries - 1, embed_dim
        return cfg.grid ** 2 + cfg.class_token, cfg.width

    def init_weights(self) -> None:
        init_blocks(self.transformer.blocks)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        check_images(cfg, images)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return self.ln_pre(x + self.positional_embedding.to(x.dtype))

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.proj is None else pooled @ self.proj

    def _pooled_and_tokens(self, x: torch.Tensor, queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's outputs -> (the row the embedding projects [B, w], the caption tokens)."""
        if self.attn_pool is not None:  # open_clip's CoCa: pooler, then ln_post; query 0 is the embedding
            x = self.ln_post(self.attn_pool(x, queries))
            return x[:, 0], x[:, 1:]
        if self.map_pool is not None:  # SigLIP: every token normalised, then the pooling head
            x = self.ln_post(x)
            return self.map_pool(x), x
        first = int(self.cfg.class_token)  # avg: the mean of the patch tokens
        if self.cfg.norm_after_pool:  # CLIPA: the pooled row is normalised, the tokens are not
            return self.ln_post(x[:, 0] if self.cfg.pool == "tok" else x[:, first:].mean(dim=1)), x
        x = self.ln_post(x)
        return (x[:, 0] if self.cfg.pool == "tok" else x[:, first:].mean(dim=1)), x

    def hidden_states(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """transformers' `hidden_states[i]` for each i of `layers` (0: the embedded patches after
        ln_pre, i: after block i; negative from the end), [B, tokens, width], unnormalised: what
        a VLM's projector reads. The blocks past the deepest one asked for are not run."""
        n = len(self.transformer.blocks)
        wanted = [i + n + 1 if i < 0 else i for i in layers]
        if not all(0 <= i <= n for i in wanted):
            raise ValueError(f"vision feature layers {layers}: the tower has {n} layers")
        x, states = self._embed(images), {}
        for i in range(max(wanted) + 1):
            if i:
                x = self.transformer.blocks[i - 1](x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What a caption decoder reads: every output token, normalised [B, 1 + grid^2, width]
        (class token first), or with the attentional pooler its caption queries [B, n - 1, embed_dim]."""
        return self.encode(images)[1]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected features [B, embed_dim], `tokens`) from one pass."""
        pooled, tokens = self._pooled_and_tokens(self.transformer(self._embed(images)))
        return self._project(pooled), tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], normalised -> pooled, projected features [B, embed_dim]."""
        x = self._embed(images)
        if self.cfg.pool == "tok":
            # Only the class token's output is used: the last block runs its query and MLP on it alone.
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self._project(self.ln_post(self.transformer(x, pool_index=index)))
        return self._project(self._pooled_and_tokens(self.transformer(x), queries=1)[0])


VISION_TOWERS = {"vit": VisionTransformer, "resnet": ModifiedResNet, "timm": TimmTower}  # VisionConfig.kind -> the tower
