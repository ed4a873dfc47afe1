"""CLIP-style text encoder: token + position embeddings, causal transformer, end-of-text pooling."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= context_length, end-of-text = the largest id of each row) -> [B, embed_dim]."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, length], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"tokens: length {tokens.shape[1]} exceeds context_length {self.cfg.context_length}")
        eot = tokens.argmax(dim=-1)
        # Nothing after the batch's last end-of-text token can change the pooled features (causal
        # attention, or padding masked out), so the sequence is cut there: exact, and most captions are short.
        length = int(eot.max()) + 1 if tokens.numel() else 0
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        if self.cfg.pool == "eot":
            x = self.transformer(x, causal=True, pool_index=eot)
        else:
            text = torch.arange(length, device=tokens.device) <= eot[:, None]  # [B, L]: start .. end-of-text
            x = self.transformer(x, mask=text[:, None, None, :])
            x = (x * text[..., None]).sum(1) / text.sum(1, keepdim=True)
        return self.ln_final(x) @ self.proj
