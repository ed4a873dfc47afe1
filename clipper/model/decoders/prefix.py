"""The captioner: a small causal LM whose input starts with the image encoder's tokens.

Sequence: [image prefix (P tokens, projected by an MLP)] [start] [prompt ...] [caption ...] [end].
Training (teacher forcing) runs it whole with a causal mask; the loss covers the caption and end
tokens only. Generation runs the prefix and prompt once (`prefill`), filling a preallocated KV
cache, then feeds one token per step (`decode`): one query over the cache, the vocabulary head on
that position only. Prompts of different lengths are left-padded; pads are masked out as keys and
positions count real tokens only, so a padded row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import DecoderConfig, ModelConfig
from ..linear import Linear, bound_layer
from ..transformer import Block, DecodeStep, bind_decode_step
from ..vision import VISION_TOWERS
from .base import Decoder, PaddedKVCache, attention_mask, bpe_end_positions
from .bpe import BPE_VOCAB_SIZE, BPECodec


@dataclass(kw_only=True)
class KVCache(PaddedKVCache):
    """Keys and values of every layer [layers, 2, B, heads, max_len, head_dim] (one tensor: a
    step writes both with one copy)."""
    kv: torch.Tensor
    steps: list[DecodeStep] | None = None  # each block's bound decode step, made at the first decode
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # the bound vocabulary head, likewise

    def select_own(self, rows: torch.Tensor) -> dict[str, Any]:
        return {"kv": self.kv[:, :, rows]}


class PrefixDecoder(Decoder):
    """Its input is tokens (the text tower is not involved); it is its own `Captioner`."""

    def __init__(self, cfg: DecoderConfig, image_width: int, prefix_length: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        vocab = list(cfg.vocab) or list(range(BPE_VOCAB_SIZE))
        # ids[j] = BPE id of vocabulary entry j; index[bpe] = j, or -1 where the id is not in it
        self.register_buffer("ids", torch.tensor(vocab, dtype=torch.long))
        index = torch.full((max(max(vocab) + 1, BPE_VOCAB_SIZE),), -1, dtype=torch.long)
        index[self.ids] = torch.arange(len(vocab))
        self.register_buffer("index", index)
        self.prefix_length = prefix_length
        self.projector = nn.Sequential(Linear(image_width, w), nn.GELU(), Linear(w, w))
        self.token_embedding = nn.Embedding(len(vocab), w)
        self.positional_embedding = nn.Parameter(torch.randn(prefix_length + cfg.context_length, w) * 0.01)
        act = "quick_gelu" if quick_gelu else "gelu"
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, act) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(w)
        self.head = Linear(w, len(vocab), bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        out_std = w ** -0.5 * (2 * cfg.layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=out_std)
            nn.init.normal_(block.mlp.proj.weight, std=out_std)

    @classmethod
    def for_model(cls, cfg: DecoderConfig, model: ModelConfig) -> "PrefixDecoder":
        """A decoder on `model`'s image tokens (`VisionTransformer.tokens`)."""
        count, width = VISION_TOWERS[model.vision.kind].token_shape(model.vision, model.embed_dim)
        return cls(cfg, width, count, model.quick_gelu)

    @property
    def vocab_size(self) -> int:
        return self.ids.numel()

    # --- what the generation engine reads (clipper.generate) ---------------------------------------
    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def codec(self) -> BPECodec:
        """Its ids are indices into its vocabulary, a subset of CLIP's BPE."""
        return BPECodec(self.cfg.context_length, self.ids, self.index)

    def captioner(self, text: nn.Module) -> "PrefixDecoder":
        """The decoder drives generation itself (it does not read the text tower)."""
        return self

    # --- the network -----------------------------------------------------------------------------
    def _embed(self, prefix: torch.Tensor | None, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        return x + self.positional_embedding[positions]

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, causal=mask is None, mask=mask, kv=None if cache is None else (cache.kv[i], cache.length))
        return self.ln_final(x)

    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None = None) -> dict:
        """Teacher-forced caption loss of BPE rows [B, L] ([start, caption..., end, 0...]) on the
        caption and end tokens (`states` is not read)."""
        eot = bpe_end_positions(tokens)
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        positions = torch.arange(length, device=tokens.device)
        valid = positions[None] <= eot[:, None]
        index = torch.zeros_like(tokens)
        index[valid] = self.codec.to_vocab(tokens[valid], "caption")
        return self(image_tokens, index, valid & (positions[None] > 0))

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> dict:
        """Teacher-forced caption loss. tokens [B, T] vocabulary indices [start, ..., end, pad...];
        loss_mask [B, T]: which tokens are predicted (caption and end, not start, prompt or padding)."""
        prefix = self.projector(image_tokens)
        P, T = prefix.shape[1], tokens.shape[1]
        x = self._embed(prefix, tokens, torch.arange(P + T, device=tokens.device))
        h = self._run(x, None, None)  # right padding: causal attention never lets a pad reach a real token
        # Position P + t - 1 predicts token t: the head runs on those positions only.
        rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)
        logits = self.head(h[rows, P + cols])
        targets = tokens[rows, cols + 1]
        loss = F.cross_entropy(logits.float(), targets)
        return {"loss": loss, "tokens": torch.tensor(float(targets.numel()))}

    # --- generation --------------------------------------------------------------------------------
    def _masked(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                cache_room: int | None) -> tuple[torch.Tensor, KVCache | None]:
        """Prefix + left-padded text through the network; the last position's logits, and a cache
        with room for `cache_room` more tokens (None: no cache)."""
        prefix = self.projector(image_tokens)
        B, P, T = tokens.shape[0], prefix.shape[1], tokens.shape[1]
        L = P + T
        key_valid = torch.cat([valid.new_ones(B, P), valid], dim=1)
        positions = key_valid.long().cumsum(1) - 1  # pads take no position
        x = self._embed(prefix, tokens, positions.clamp(min=0))
        cache = None
        if cache_room is not None:
            shape = (len(self.blocks), 2, B, self.cfg.heads, L + cache_room, self.cfg.width // self.cfg.heads)
            cache = KVCache(kv=x.new_zeros(shape),
                            valid=torch.cat([key_valid, key_valid.new_ones(B, cache_room)], 1),
                            positions=positions[:, -1] + 1, padded=not bool(valid.all()))
        h = self._run(x, attention_mask(key_valid), cache)
        if cache is not None:
            cache.length = L
        return self.head(h[:, -1]), cache

    def prefill(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                max_new_tokens: int) -> tuple[torch.Tensor, KVCache]:
        """Run prefix + left-padded text [B, T] (vocabulary indices; `valid` marks real tokens)
        once; return the next-token logits [B, V] and a cache with room for `max_new_tokens`."""
        return self._masked(image_tokens, tokens, valid, max_new_tokens)

    def decode(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row [B] (vocabulary indices); return the next-token logits [B, V]."""
        cache.check_room(cache.kv.shape[4])
        # .forward, not __call__, on this per-token path: hook dispatch is ~2 us a call (see bind_decode_step)
        x = self.token_embedding.forward(token) + self.positional_embedding[cache.positions]
        # one query over the cache: without padding it may see every cached key, so no mask at all
        n = cache.length
        mask = cache.valid[:, None, None, :n + 1] if cache.padded else None
        if cache.steps is None:
            cache.steps = [bind_decode_step(block) for block in self.blocks]
            cache.head = bound_layer(self.head)
        for step, kv in zip(cache.steps, cache.kv):
            x = step(x, kv, n, mask)
        cache.length += 1
        cache.positions = cache.positions + 1
        return cache.head(self.ln_final.forward(x))

    def full_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] by recomputing the whole sequence (no cache): the reference the
        cached path must match, and the baseline of the decode benchmark."""
        return self._masked(image_tokens, tokens, valid, None)[0]
