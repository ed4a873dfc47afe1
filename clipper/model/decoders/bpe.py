"""CLIP's BPE as a decoder's ids (the `Codec` of the prefix decoder and of CoCa)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import ConfigError
from ...tokenizer import Tokenizer
from .base import TextCodec

BPE_VOCAB_SIZE = 49408
EOT_ID = 49407


class BPECodec(TextCodec):
    """Prompts through CLIP's tokenizer. `ids` [V] lists the BPE id of each of the decoder's
    vocabulary entries and `index` maps BPE ids back (-1: not in it), for a decoder whose head
    covers a subset of the BPE (the tokens of its training captions); without them the decoder's
    ids are BPE ids, `vocab_size` of them. `extra_stops`: more BPE ids that end a greedy or
    sampled caption (CoCa's padding)."""

    def __init__(self, context_length: int, ids: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 vocab_size: int = BPE_VOCAB_SIZE, extra_stops: Sequence[int] = ()):
        self.tokenizer = Tokenizer(context_length)
        self.ids, self.index = ids, index
        self.vocab_size = ids.numel() if ids is not None else vocab_size
        self.end_id = int(self.to_vocab(torch.tensor([EOT_ID]))[0])
        self.stop_ids = (self.end_id, *(int(i) for i in self.to_vocab(torch.tensor(list(extra_stops),
                                                                                  dtype=torch.long))))

    def to_vocab(self, bpe: torch.Tensor, what: str = "tokens") -> torch.Tensor:
        """BPE ids -> the decoder's ids; ids outside its vocabulary are an error."""
        if self.index is None:
            if bpe.numel() and int(bpe.max()) >= self.vocab_size:
                raise ConfigError(f"{what}: token id {int(bpe.max())} is outside the vocabulary ({self.vocab_size})")
            return bpe
        if bpe.numel() and int(bpe.max()) >= self.index.numel():
            raise ConfigError(f"{what}: token id {int(bpe.max())} is not a CLIP BPE id")
        out = self.index[bpe.to(self.index.device)]
        if (out < 0).any():
            missing = sorted(set(bpe[out.cpu() < 0].tolist()))[:5]
            raise ConfigError(f"{what}: token id(s) {missing} are not in the captioner's vocabulary "
                              f"({self.vocab_size} tokens, from its training captions)")
        return out

    def to_bpe(self, index: torch.Tensor) -> torch.Tensor:
        return index if self.ids is None else self.ids[index.to(self.ids.device)]

    def prompt(self, text: str) -> list[int]:
        row = [self.tokenizer.sot_id, *self.tokenizer.encode(text)]
        return self.to_vocab(torch.tensor(row), f"prompt {text!r}").tolist()

    def texts(self, prompts: Sequence[str], per_image: list[list[list[int]]]) -> list[list[str]]:
        """One lookup of BPE ids for all the sequences (a tensor op per caption costs as much as a
        decode step's)."""
        flat = [i for seqs in per_image for seq in seqs for i in seq]
        bpe = iter(self.to_bpe(torch.tensor(flat, dtype=torch.long)).tolist() if flat else [])
        out = []
        for prompt, seqs in zip(prompts, per_image):
            ids = self.tokenizer.encode(prompt)
            out.append([self.tokenizer.decode(ids + [next(bpe) for _ in seq]) for seq in seqs])
        return out
