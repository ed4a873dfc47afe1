"""The `Captioner` of a pretrained causal language model that reads images in place of its prompt's
image tokens: a VLM's (clipper.vlm) and the llava decoder's. The language model is any module with
`embed(ids)`, `new_cache(batch, capacity)` and `forward(embeds, mask, positions, cache, last_only)`
(`llama.LlamaLM`, or transformers' module in `language.LanguageModel`)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .base import Codec, PaddedKVCache


@dataclasses.dataclass(kw_only=True)
class LMCache(PaddedKVCache):
    kv: object  # the language model's transformers Cache

    def select_own(self, rows: torch.Tensor) -> dict:
        self.kv.batch_select_indices(rows)  # in place: the engine keeps only the selected cache
        return {"kv": self.kv}


IGNORE = -100  # labels that take no loss


class SplicedCaptioner:
    """The `Captioner` of a causal language model (`language`) whose prompt's image tokens
    (`image_token_id`) are replaced by the image's features: `prefill` runs the prompt with its
    images once into the language model's KV cache, `decode` feeds one token per row,
    `full_logits` recomputes (the reference). `image_inputs` maps what the engine is given per
    image to the language model's inputs (a VLM is given them; a decoder projects its tower's)."""
    language: nn.Module
    image_token_id: int
    codec: Codec
    context_length: int

    def image_inputs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return image_tokens

    def _inputs(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The prompt's embeddings with each row's image tokens replaced by its images' features
        (`image_tokens` [B, n, D], in order; a row with fewer image tokens takes the first ones:
        rows are zero-padded to the longest)."""
        embeds = self.language.embed(tokens)
        image_tokens = self.image_inputs(image_tokens)
        where = tokens == self.image_token_id
        counts, n = where.sum(1), image_tokens.shape[1]
        if int(counts.max()) != n or (len(tokens) == 1 and int(counts[0]) != n):
            raise ConfigError(f"prompt: {counts.tolist()} image token positions for {n} image features")
        taken = image_tokens[torch.arange(n, device=tokens.device)[None] < counts[:, None]]
        return embeds.masked_scatter(where[..., None], taken.to(embeds.dtype))

    @staticmethod
    def _positions(valid: torch.Tensor) -> torch.Tensor:
        return (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)  # as transformers' generate

    def prefill(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                room: int) -> tuple[torch.Tensor, LMCache]:
        kv = self.language.new_cache(tokens.shape[0], tokens.shape[1] + room)
        logits = self.language(self._inputs(image_tokens, tokens), valid, self._positions(valid), kv)[:, -1]
        return logits, LMCache(valid=valid, positions=valid.long().sum(1), length=tokens.shape[1],
                               padded=not bool(valid.all()), kv=kv)

    def decode(self, token: torch.Tensor, cache: LMCache) -> torch.Tensor:
        cache.check_room(self.context_length)
        cache.valid = torch.cat([cache.valid, cache.valid.new_ones(len(token), 1)], 1)
        logits = self.language(self.language.embed(token[:, None]), cache.valid, cache.positions[:, None], cache.kv)
        cache.positions = cache.positions + 1
        cache.length += 1
        return logits[:, -1]

    def full_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.language(self._inputs(image_tokens, tokens), valid, self._positions(valid))[:, -1]

    def answer_loss(self, image_tokens: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """Teacher-forced mean cross-entropy of the labelled tokens of right-padded rows `ids`
        [B, T] (`labels`: the id each position holds where it is predicted, IGNORE elsewhere)
        after each row's images; the vocabulary head runs on the predicting positions only. The
        tokens every row starts with before its first image (the chat template's system prompt and
        turn start) run once, not once per row, where the language model is frozen and can."""
        predicting = torch.zeros_like(valid)
        predicting[:, :-1] = labels[:, 1:] != IGNORE
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        embeds = self._inputs(image_tokens, ids)
        shared = self._shared_start(ids, predicting)
        prefix = None
        if shared:
            with torch.no_grad():
                prefix = self.language.new_cache(1, shared)
                self.language(embeds[:1, :shared], valid[:1, :shared], positions[:1, :shared], prefix)
        logits = self.language(embeds[:, shared:], valid, positions[:, shared:], None,
                               last_only=predicting[:, shared:], **({"prefix": prefix} if shared else {}))
        return F.cross_entropy(logits.float(), labels[:, 1:][predicting[:, :-1]])

    def _shared_start(self, ids: torch.Tensor, predicting: torch.Tensor) -> int:
        """How many first tokens every row holds alike before any image or predicting position,
        where the language model takes a shared prefix (clipper's own) and none of its weights
        trains; else 0."""
        if not getattr(self.language, "takes_prefix", False) or len(ids) < 2 or \
                any(p.requires_grad for p in self.language.parameters()):
            return 0
        differs = (ids != ids[:1]).any(0) | (ids == self.image_token_id).any(0) | predicting.any(0)
        return int(differs.long().argmax()) if bool(differs.any()) else 0
