"""What every caption decoder is to the rest of clipper, whatever its network and tokenizer.

A decoder kind is a `Decoder` module (trained by the caption objective: `loss`, `target_counts`)
that hands the generation engine (`clipper.generate`) a `Captioner`: `prefill` a batch of
left-padded prompts after the image into a cache, then `decode` one token per row, or
`full_logits` (recompute: the reference the cache is checked against); and a `Codec`, the
decoder's own token ids: prompts in, texts out, the end and stop tokens, the vocabulary size.
The engine knows no tokenizer. Caches are `PaddedKVCache`s: the rows' real-token masks and
positions, and `select(rows)` for beams and samples.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ...chunks import chunked
from ...tokenizer import Tokenizer


class Codec:
    """A decoder's token ids as the engine reads them. `end_id` ends a caption (a beam that picks
    it, or another of `end_ids`, is finished; before min_new_tokens they are forbidden); a greedy
    or sampled caption ends at any of `stop_ids`."""
    vocab_size: int
    end_id: int
    stop_ids: tuple[int, ...]

    @property
    def end_ids(self) -> tuple[int, ...]:
        return (self.end_id,)


class TextCodec(Codec, ABC):
    """A caption decoder's ids and text: prompts in, captions out."""

    @abstractmethod
    def prompt(self, text: str) -> list[int]:
        """The ids a caption of `text` continues from (the start token included)."""

    @abstractmethod
    def texts(self, prompts: Sequence[str], per_image: list[list[list[int]]]) -> list[list[str]]:
        """Each image's prompt followed by each of its generated id sequences, as text."""


class Captioner(Protocol):
    """What the generation engine drives."""
    codec: Codec
    context_length: int  # prompt and caption tokens together

    def prefill(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                room: int) -> tuple[torch.Tensor, "PaddedKVCache"]: ...

    def decode(self, token: torch.Tensor, cache: "PaddedKVCache") -> torch.Tensor: ...

    def full_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(kw_only=True)
class PaddedKVCache:
    """The part of a decode cache every decoder has: which cached positions are real tokens (not
    left padding), each row's next position id, how many positions are filled, and whether any
    row has a hidden key (else a decode step needs no mask). Subclasses add their key/value
    tensors and say how their rows are taken in `select`."""
    valid: torch.Tensor  # [R, S] bool
    positions: torch.Tensor  # [R]
    length: int = 0
    padded: bool = True

    def select(self, rows: torch.Tensor) -> "PaddedKVCache":
        """The cache of rows `rows` (beam reordering, several samples per image)."""
        return dataclasses.replace(self, valid=self.valid[rows], positions=self.positions[rows],
                                   **self.select_own(rows))

    def select_own(self, rows: torch.Tensor) -> dict[str, Any]:
        """The subclass's own row-indexed fields, taken at `rows`."""
        return {}

    def check_room(self, capacity: int) -> None:
        if self.length >= capacity:
            raise ValueError("decode: the KV cache is full (raise max_new_tokens at prefill)")


def attention_mask(key_valid: torch.Tensor, query_valid: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """[B, 1, T, S] for a prefill over left-padded rows: causal among the keys that are real
    (`key_valid` [B, S]); the queries are the positions from `start` on (the keys before them are
    a cache); a padding query (`query_valid` [B, T] False; default: its own key's validity)
    attends to itself only, so that no softmax is empty."""
    S, device = key_valid.shape[1], key_valid.device
    query_valid = key_valid[:, start:] if query_valid is None else query_valid
    query, key = torch.arange(start, S, device=device)[:, None], torch.arange(S, device=device)[None]
    pad_self = (key == query)[None] & ~query_valid[:, :, None]
    return (((key <= query)[None] & key_valid[:, None, :]) | pad_self)[:, None]


def bpe_end_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Where each CLIP BPE row [start, caption..., end, 0...] has its end token: the largest id."""
    return tokens.argmax(dim=-1)


class Decoder(nn.Module):
    """A caption decoder module. `reads_text_states`: its input is the text tower's states (else
    the caption's token ids). The decoders here train on CLIP BPE rows; one with its own tokenizer
    overrides `training_tokenizer` and `target_counts`; one that reads other image tokens than the
    tower's outputs, `image_tokens`; one with files beside its weights, `bundle`; one whose prompts
    depend on the image, `prompt_rows` (one that retrieves captions into them: `retrieves` k, its
    `datastore` and the training captions' `neighbours`, which the caption objective fills)."""
    reads_text_states = False
    bpe_vocabulary = True  # its head covers CLIP BPE ids (the training captions' unless configured)
    reads_instructions = False  # its training tokenizer takes (question, answer, caption) turns too
    retrieves = 0  # captions retrieved into each prompt
    datastore: Any = None  # a .datastore.Datastore where it retrieves
    neighbours: dict[str, list[str]] = {}  # each training caption's retrieved captions (never its own)
    cfg: Any

    def image_tokens(self, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of preprocessed images: the tower's output tokens."""
        return chunked(visual, images, "tokens")

    def training_tokenizer(self) -> Callable[[Sequence[str]], torch.Tensor]:
        """Captions -> the rows `loss` reads: CLIP BPE to the decoder's context."""
        return Tokenizer(self.cfg.context_length)

    def prompt_rows(self, model: nn.Module, pixels: torch.Tensor, prompts: Sequence[str],
                    codec: TextCodec) -> list[list[int]]:
        """The prompt ids each image's caption continues from (`model`: the CLIP it sits on, for a
        decoder whose prompt depends on the image; `codec`: its captioner's)."""
        return [codec.prompt(p) for p in prompts]

    def pretrained_parts(self) -> list[nn.Module]:
        """Its parts that come pretrained (a language model): frozen unless the run trains them."""
        return []

    def bundle(self, path: Path) -> Any:
        """Write what the decoder needs beside its weights into the model folder `path`; return the
        config to save (naming those files)."""
        return self.cfg

    @classmethod
    def check(cls, cfg: Any, model: Any) -> None:
        """Refuse a model config (`ModelConfig`) this decoder cannot sit on (ConfigError)."""

    @classmethod
    @abstractmethod
    def for_model(cls, cfg: Any, model: Any) -> "Decoder":
        """A freshly initialised decoder of `cfg` (`DecoderConfig`) for a model of config `model`."""

    @abstractmethod
    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None) -> dict:
        """Teacher-forced caption loss: {"loss", "tokens" (how many were predicted)}."""

    def target_counts(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens `loss` predicts in each training row [B]: the caption and its end."""
        return bpe_end_positions(tokens)

    @abstractmethod
    def captioner(self, text: nn.Module) -> Captioner:
        """What generation drives; `text`: the model's text tower (CoCa's decoder reads it)."""
