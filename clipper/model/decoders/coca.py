"""CoCa's multimodal decoder (open_clip's `text_decoder`), and CoCa captioning with KV caches.

CoCa captions through two stacks: the text tower (causal, its class token unused) turns tokens
into states, and the decoder runs causal self-attention over those states, cross-attention to the
image's caption tokens (the attentional pooler's outputs) and a head over the BPE vocabulary.
Generation caches the keys and values of both stacks; the cross-attention keys and values are
computed once per image and read by all of its beams and samples in place (`Attention.cross`).

open_clip conventions kept, because its CoCa weights were trained or are used with them: the
text tower hides key j where token j - 1 is padding (0), also inside a prompt; a caption ends at
end-of-text, and in greedy or sampled generation also at a padding token (open_clip's `generate`
stops a row there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import DecoderConfig, ModelConfig
from ...errors import ConfigError
from ..linear import bound_linear
from ..text import TextTransformer
from ..transformer import Block, CrossBlock, CrossStep, DecodeStep, bind_cross_step, bind_decode_step, init_blocks
from .base import Decoder, PaddedKVCache, attention_mask
from .bpe import BPECodec

PAD_ID = 0


class CoCaDecoder(Decoder):
    reads_text_states = True  # its input is the text tower's states, not tokens

    def __init__(self, cfg: DecoderConfig, vocab_size: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        act = "quick_gelu" if quick_gelu else "gelu"
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, act) for _ in range(cfg.layers))
        self.cross = nn.ModuleList(CrossBlock(w, cfg.heads, cfg.mlp_ratio, act) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, vocab_size))
        init_blocks(self.blocks)
        init_blocks(self.cross)
        nn.init.normal_(self.proj, std=w ** -0.5)

    @classmethod
    def check(cls, d: DecoderConfig, model: ModelConfig) -> None:
        if model.vision.pool != "attn" or model.text.pool != "cls":
            raise ConfigError("decoder.kind coca: needs vision.pool attn (caption tokens) and text.pool cls")
        if d.width != model.text.width or d.width != model.embed_dim:
            raise ConfigError(f"decoder.kind coca: decoder.width {d.width} must equal text.width {model.text.width} "
                              f"and embed_dim {model.embed_dim} (it reads both without a projection)")
        if d.vocab or d.context_length > model.text.context_length:
            raise ConfigError("decoder.kind coca: the vocabulary is the text tower's (decoder.vocab empty) and "
                              "decoder.context_length at most text.context_length")

    @classmethod
    def for_model(cls, cfg: DecoderConfig, model: ModelConfig) -> "CoCaDecoder":
        return cls(cfg, model.text.vocab_size, model.quick_gelu)

    def context(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every cross-attention layer's keys and values of the image's caption tokens, each
        [2, B, H, N, C/H] and contiguous (each decode step reads them all: 20% faster than the
        projection's strided view; one stacked tensor cost 40-250 ms to build at B-32 x 8 images)."""
        return tuple(block.context(image_tokens).contiguous() for block in self.cross)

    def hidden(self, states: torch.Tensor, context: tuple[torch.Tensor, ...], mask: torch.Tensor | None = None,
               caches: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's blocks over text states [B, T, C]: causal (or `mask` [B, 1, T, T]), filling
        `caches` [layers, 2, B, H, S, C/H] from position 0 when given."""
        x = states
        for i, (block, cross) in enumerate(zip(self.blocks, self.cross)):
            x = block(x, causal=mask is None, mask=mask, kv=None if caches is None else (caches[i], 0))
            x = cross(x, context[i])
        return self.ln_final(x)

    def forward(self, image_tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] at every position (open_clip's `text_decoder(image_embs, token_embs)`)."""
        return self.hidden(states, self.context(image_tokens)) @ self.proj

    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> dict:
        """Teacher-forced caption loss of BPE rows [B, L] ([start, caption..., end, 0...]) on `states`
        (the text tower's, `TextTransformer.states`): position t predicts token t + 1; padding (0)
        is not a target (open_clip's CoCaLoss: ignore_index = pad id)."""
        last = states.shape[1] - 1  # the batch's last end-of-text: nothing after it is predicted
        targets = tokens[:, 1:last + 1]
        h = self.hidden(states[:, :last], self.context(image_tokens))
        rows, cols = (targets != PAD_ID).nonzero(as_tuple=True)
        loss = F.cross_entropy((h[rows, cols] @ self.proj).float(), targets[rows, cols])
        return {"loss": loss, "tokens": torch.tensor(float(rows.numel()))}

    def captioner(self, text: TextTransformer) -> "CoCaCaptioner":
        return CoCaCaptioner(text, self)


class CoCaSteps(NamedTuple):
    """The bound decode path (made at the first decode): text tower, decoder self- and
    cross-attention blocks, and the head on the final LayerNorm."""
    text: list[DecodeStep]
    blocks: list[DecodeStep]
    cross: list[CrossStep]
    head: Callable[[torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class CoCaCache(PaddedKVCache):
    """Keys and values of the text tower's and the decoder's layers [layers, 2, R, H, S, C/H], the
    decoder's cross-attention keys and values per image (per layer [2, B, H, N, C/H]; R = B x rows
    per image), and which cached positions each stack may attend to (`valid`: the decoder's keys)."""
    text_kv: torch.Tensor
    kv: torch.Tensor
    context: tuple[torch.Tensor, ...]
    text_valid: torch.Tensor  # [R, S] the text tower's keys: real, and not after a padding token
    last: torch.Tensor  # [R] each row's last token
    text_padded: bool = True  # some row has a hidden text-tower key
    steps: CoCaSteps | None = None

    def select_own(self, rows: torch.Tensor) -> dict[str, Any]:
        """Rows must keep each image's rows together (beams, samples): the context is per image."""
        B = self.context[0].shape[1]
        per = len(rows) // B
        old = self.kv.shape[2] // B
        if len(rows) != B * per or not bool((rows // old == torch.arange(len(rows), device=rows.device) // per).all()):
            raise ValueError("CoCaCache.select: rows must stay with their image (same number per image, in order)")
        return {"text_kv": self.text_kv[:, :, rows], "kv": self.kv[:, :, rows], "text_valid": self.text_valid[rows],
                "last": self.last[rows]}


class CoCaCaptioner:
    """What the generation engine drives (`clipper.generate`): a CoCa model's text tower and
    decoder; token ids are BPE ids (the vocabulary is the whole BPE)."""

    def __init__(self, text: TextTransformer, decoder: CoCaDecoder):
        self.text, self.decoder = text, decoder
        self.context_length = decoder.cfg.context_length
        self.codec = BPECodec(self.context_length, vocab_size=text.cfg.vocab_size, extra_stops=(PAD_ID,))

    def _run(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
             room: int | None) -> tuple[torch.Tensor, CoCaCache | None]:
        """Left-padded BPE rows [B, T] (`valid`: real tokens) through both stacks; the last position's
        logits, and caches with room for `room` more tokens (None: none)."""
        B, T = tokens.shape
        text = self.text
        positions = valid.long().cumsum(1) - 1
        first = valid & (positions == 0)
        after_pad = torch.cat([tokens.new_zeros(B, 1), tokens[:, :-1]], 1) == PAD_ID
        text_valid = valid & (first | ~after_pad)
        x = text.token_embedding(tokens) + text.positional_embedding[positions.clamp(min=0)]
        # a real row may not see its own hidden key (text_valid False after a padding token)
        masks = [attention_mask(keys, valid) for keys in (text_valid, valid)]
        cache = None
        if room is not None:
            S = T + room

            def stack(layers: int, heads: int, width: int) -> torch.Tensor:
                return x.new_zeros(layers, 2, B, heads, S, width // heads)

            grow = valid.new_ones(B, room)
            cache = CoCaCache(text_kv=stack(len(text.transformer.blocks), text.cfg.heads, text.cfg.width),
                              kv=stack(len(self.decoder.blocks), self.decoder.cfg.heads, self.decoder.cfg.width),
                              context=self.decoder.context(image_tokens), valid=torch.cat([valid, grow], 1),
                              text_valid=torch.cat([text_valid, grow], 1), positions=positions[:, -1] + 1,
                              last=tokens[:, -1], length=T, padded=not bool(valid.all()),
                              text_padded=not bool(text_valid.all()))
        for i, block in enumerate(text.transformer.blocks):
            x = block(x, mask=masks[0], kv=None if cache is None else (cache.text_kv[i], 0))
        context = self.decoder.context(image_tokens) if cache is None else cache.context
        h = self.decoder.hidden(x, context, masks[1], None if cache is None else cache.kv)
        return h[:, -1] @ self.decoder.proj, cache

    def prefill(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                max_new_tokens: int) -> tuple[torch.Tensor, CoCaCache]:
        return self._run(image_tokens, tokens, valid, max_new_tokens)

    def full_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits by recomputing everything (the reference the cached path must match)."""
        return self._run(image_tokens, tokens, valid, None)[0]

    def decode(self, token: torch.Tensor, cache: CoCaCache) -> torch.Tensor:
        """Feed one token per row [B]; return the next-token logits [B, V]."""
        n = cache.length
        cache.check_room(cache.kv.shape[4])
        text = self.text
        if cache.steps is None:
            decoder = self.decoder
            cache.steps = CoCaSteps([bind_decode_step(b) for b in text.transformer.blocks],
                                    [bind_decode_step(b) for b in decoder.blocks],
                                    [bind_cross_step(b) for b in decoder.cross],
                                    bound_linear(decoder.proj, transposed=True))
        after_pad = cache.last == PAD_ID
        if bool(after_pad.any()):  # open_clip's shifted mask: the key after a padding token is hidden
            cache.text_valid[:, n] = ~after_pad
            cache.text_padded = True
        x = text.token_embedding.forward(token) + text.positional_embedding[cache.positions]
        text_mask = cache.text_valid[:, None, None, :n + 1] if cache.text_padded else None
        steps = cache.steps
        for step, kv in zip(steps.text, cache.text_kv):
            x = step(x, kv, n, text_mask)
        mask = cache.valid[:, None, None, :n + 1] if cache.padded else None
        for step, cross, kv, context in zip(steps.blocks, steps.cross, cache.kv, cache.context):
            x = cross(step(x, kv, n, mask), context)
        cache.length += 1
        cache.positions = cache.positions + 1
        cache.last = token
        return steps.head(self.decoder.ln_final.forward(x))
