"""CLIP-style text encoder: token + position embeddings, a transformer, then pooling: one position
(the end-of-text token, the first eos id, or the input's last: causal, or bidirectional over the
padded input as in SigLIP), the mean of the tokens (bidirectional), or CoCa's class token."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .linear import Linear
from .transformer import Transformer, init_blocks


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        # CoCa's class token sits after the longest text: one more position
        self.cls_emb = nn.Parameter(torch.empty(w)) if cfg.pool == "cls" else None
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + (cfg.pool == "cls"), w))
        act = "quick_gelu" if quick_gelu else cfg.act
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, act, cfg.norm_eps)
        self.ln_final = nn.LayerNorm(w, eps=cfg.norm_eps)
        # [width, embed_dim] as open_clip's text_projection; with a bias, a linear layer as open_clip's
        self.proj = Linear(w, embed_dim) if cfg.proj_bias else nn.Parameter(torch.empty(w, embed_dim))
        if not cfg.projection:
            self.proj = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init (as open_clip's text tower): small embeddings (the blocks: `init_blocks`)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.proj, nn.Parameter):
            nn.init.normal_(self.proj, std=self.cfg.width ** -0.5)
        elif self.proj is not None:  # with a bias
            nn.init.normal_(self.proj.weight, std=self.cfg.width ** -0.5)
            nn.init.zeros_(self.proj.bias)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)

    def init_blocks(self) -> None:
        """Depth-scaled residual outputs (open_clip's)."""
        init_blocks(self.transformer.blocks)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return x
        return self.proj(x) if isinstance(self.proj, nn.Module) else x @ self.proj

    def _check(self, tokens: torch.Tensor) -> torch.Tensor:
        """The end-of-text position of each row (the largest id)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, length], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"tokens: length {tokens.shape[1]} exceeds context_length {self.cfg.context_length}")
        return tokens.argmax(dim=-1)

    def pool_index(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """[B] the position pooled (pool eot, eos or last)."""
        if self.cfg.pool == "eos":  # no eos in a row: position 0, as open_clip
            return (tokens == self.cfg.eos_id).int().argmax(dim=-1)
        if self.cfg.pool == "last":
            return torch.full_like(eot, tokens.shape[1] - 1)
        return eot

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= context_length, end-of-text = the largest id of each row) -> [B, embed_dim]."""
        eot = self._check(tokens)
        if self.cls_emb is not None:
            x, mask = self._with_cls(tokens, eot)
            pool = torch.full_like(eot, x.shape[1] - 1)
            return self.project(self.ln_final(self.transformer(x, mask=mask, pool_index=pool)))
        if self.cfg.pool == "mean":
            length = _used_length(tokens, eot)
            x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
            text = torch.arange(length, device=tokens.device) <= eot[:, None]  # [B, L]: start .. end-of-text
            x = self.transformer(x, mask=text[:, None, None, :])
            return self.project(self.ln_final((x * text[..., None]).sum(1) / text.sum(1, keepdim=True)))
        index = self.pool_index(tokens, eot)
        # causal: nothing after the pooled positions can change them; bidirectional: every position counts
        length = _used_length(tokens, index) if self.cfg.causal else tokens.shape[1]
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        return self.project(self.ln_final(self.transformer(x, causal=self.cfg.causal, pool_index=index)))

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer's outputs (before ln_final) at positions 0 .. the last end-of-text [B, T, width]:
        what CoCa's decoder reads. Exact up to each row's end-of-text (causal; a row's padding after it
        sees what a full run would not, and is never read)."""
        eot = self._check(tokens)
        length = _used_length(tokens, eot)
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        return self.transformer(x, causal=True)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, embed_dim], `states`) from one pass (CoCa's joint training)."""
        if self.cls_emb is None and self.cfg.pool == "eot" and self.cfg.causal:  # the states hold the pooled row
            states = self.states(tokens)
            eot = tokens.argmax(dim=-1)
            return self.project(self.ln_final(states[torch.arange(len(eot), device=eot.device), eot])), states
        if self.cls_emb is None:  # other pooling: the decoder still reads causal states
            return self(tokens), self.states(tokens)
        eot = self._check(tokens)
        x, mask = self._with_cls(tokens, eot)
        x = self.transformer(x, mask=mask)
        return self.project(self.ln_final(x[:, -1])), x[:, :int(eot.max()) + 1]

    def _with_cls(self, tokens: torch.Tensor, eot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the text (cut after the longest row's first padding) and the class token
        after it, and open_clip's mask [B, 1, T + 1, T + 1]: causal, and key j hidden where token
        j - 1 is padding; the class token keeps position L and sees itself only in a row without
        padding, as in open_clip (its CoCa weights were trained so)."""
        B, L = tokens.shape
        keep = min(L, _used_length(tokens, eot) + 1)  # later keys are hidden in every row
        x = self.token_embedding(tokens[:, :keep]) + self.positional_embedding[:keep]
        cls = (self.cls_emb + self.positional_embedding[L]).to(x.dtype).expand(B, 1, -1)
        keys = torch.cat([tokens.new_ones(B, 1, dtype=torch.bool), tokens[:, :keep - 1] != 0,
                          (tokens[:, L - 1] != 0)[:, None]], 1)
        causal = torch.ones(keep + 1, keep + 1, dtype=torch.bool, device=tokens.device).tril()
        return torch.cat([x, cls], 1), (causal[None] & keys[:, None, :])[:, None]


def _used_length(tokens: torch.Tensor, eot: torch.Tensor) -> int:
    """Positions 0 .. the batch's last pooled position: nothing after it can change the pooled features
    (causal attention, or padding masked out), so the sequence is cut there: exact, and most
    captions are short. An exported graph (ONNX) must serve any input: it keeps every position."""
    if torch.compiler.is_exporting():
        return tokens.shape[1]
    return int(eot.max()) + 1 if tokens.numel() else 0
