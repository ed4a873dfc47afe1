"""The CLIP BPE tokenizer: open_clip's SimpleTokenizer and its shipped vocabulary.

Rows are [start, ...text..., end, 0, 0, ...]; a text too long for the context is cut and its last
kept position becomes the end token, so every row keeps its end-of-text (the pooling position).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import torch

from .errors import ConfigError


@functools.lru_cache(maxsize=1)
def _bpe():
    # Loading the 49k-merge vocabulary takes a moment: share one instance per process.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def detokenize(text: str) -> str:
    """Undo the spaces that BPE decoding puts around punctuation ("t - shirt ." -> "t-shirt.").

    The BPE splits "t-shirt" and "t - shirt" alike, so decoding cannot tell them apart; the
    written form (no space before punctuation or contractions, none around hyphens) is the
    common one in captions.
    """
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ?- ?", "-", text)
    text = re.sub(r" ([.,!?;:%)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return re.sub(r" '(s|t|re|ve|m|ll|d)\b", r"'\1", text)


@functools.lru_cache(maxsize=1 << 16)
def _encode(text: str) -> tuple[int, ...]:
    # Captions repeat (templates, class names): text cleaning (ftfy) and BPE are the slow part.
    return tuple(_bpe().encode(text))


class Tokenizer:
    """Text -> token ids [N, context_length] (int64), and ids -> text."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ConfigError(f"context_length: needs room for start and end tokens (>= 2), got {context_length}")
        self.context_length = context_length
        bpe = _bpe()
        self.sot_id: int = bpe.sot_token_id
        self.eot_id: int = bpe.eot_token_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` alone, without start/end tokens or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return list(_encode(text))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)][: n - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of one row of ids: the start token dropped, read up to the end token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = []
        for i in ids:
            if i == self.eot_id:
                break
            if i != self.sot_id:  # id 0 is '!' as well as padding; padding only follows the end
                kept.append(int(i))
        return detokenize(_bpe().decode(kept))

    def batch_decode(self, rows: torch.Tensor | Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(r) for r in rows]


def caption_vocabulary(captions: Iterable[str], context_length: int) -> tuple[int, ...]:
    """Sorted BPE ids of the captions (as tokenized at `context_length`), start and end included:
    the output vocabulary of a captioner trained on them."""
    tokenizer = Tokenizer(context_length)
    ids = {tokenizer.sot_id, tokenizer.eot_id}
    for caption in captions:
        ids.update(tokenizer.encode(caption)[: context_length - 2])
    return tuple(sorted(ids))
