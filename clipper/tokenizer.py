"""Tokenizers: the CLIP BPE (open_clip's SimpleTokenizer and its shipped vocabulary), and the
Hugging Face tokenizers of SigLIP, SigLIP2, CLIPA and the multilingual towers, run as open_clip's
HFTokenizer runs them. `tokenizer_for(text config)` picks the one a text tower was trained with.

CLIP BPE rows are [start, ...text..., end, 0, 0, ...]; a text too long for the context is cut and its
last kept position becomes the end token, so every row keeps its end-of-text (the pooling position).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Iterable, Sequence

import torch

from .config import TextConfig
from .errors import ConfigError
from .hub import from_hub


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


class HFTokenizer:
    """A Hugging Face tokenizer (a directory, or a hub name found in the local HF cache) with open_clip's
    cleaning, padding to the context and truncation: the ids open_clip's HFTokenizer gives."""

    def __init__(self, name: str, context_length: int, clean: str = "whitespace", strip_sep: bool = False):
        self.name, self.context_length = name, context_length
        self._open_clip = _load_hf(name, context_length, clean, strip_sep)
        hf = self._open_clip.tokenizer
        self.sot_id = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
        self.eot_id = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone (cleaned as for the tower), without special tokens or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._open_clip.tokenizer(self._open_clip.clean_fn(text), add_special_tokens=False).input_ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self._open_clip([texts] if isinstance(texts, str) else list(texts)).long()

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self._open_clip.tokenizer.decode(list(ids), skip_special_tokens=True)

    def batch_decode(self, rows: torch.Tensor | Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(r) for r in rows]


@functools.lru_cache(maxsize=8)
def _load_hf(name: str, context_length: int, clean: str, strip_sep: bool):
    if importlib.util.find_spec("transformers") is None:  # open_clip's HFTokenizer runs on it
        raise ConfigError(f"text.tokenizer {name!r} is a Hugging Face tokenizer: pip install 'clipper[hf]' "
                          "(transformers)")
    from open_clip.tokenizer import HFTokenizer as OpenClipHF

    return from_hub(lambda **kw: OpenClipHF(name, context_length=context_length, clean=clean,
                                            strip_sep_token=strip_sep, **kw),
                    name, "text.tokenizer", instead="save it to a folder and pass --tokenizer DIR")


def tokenizer_for(text: TextConfig, context_length: int | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer a text tower reads: CLIP BPE, or the Hugging Face tokenizer its config names."""
    n = context_length or text.context_length
    if not text.tokenizer:
        return Tokenizer(n)
    return HFTokenizer(text.tokenizer, n, text.tokenizer_clean, text.tokenizer_strip_sep)


def caption_vocabulary(captions: Iterable[str], context_length: int) -> tuple[int, ...]:
    """Sorted BPE ids of the captions (as tokenized at `context_length`), start and end included:
    the output vocabulary of a captioner trained on them."""
    tokenizer = Tokenizer(context_length)
    ids = {tokenizer.sot_id, tokenizer.eot_id}
    for caption in captions:
        ids.update(tokenizer.encode(caption)[: context_length - 2])
    return tuple(sorted(ids))
