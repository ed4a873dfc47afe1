"""Embedding images and texts, fast on CPUs: decode and resize in DataLoader workers in uint8,
normalise whole batches, run the model under `inference_mode`; and zero-shot classification.
These are the model's verbs (`CLIP.embed_images`, ...): they read the model only through its
methods (any model with `encode_image` / `encode_text`, an ONNX one too), so the model imports
them, not the reverse. Output folders of `clipper embed` are `clipper.embed_dir`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data.items import ImageItem
from .errors import ConfigError, ImageError
from .images import MAX_PIXELS, decode_image
from .progress import Progress
from .prompts import DEFAULT_TEMPLATES, check_templates

if TYPE_CHECKING:  # the model calls these as its verbs: it imports this module
    from .model import CLIP


class ImageFiles(Dataset):
    """Item i -> (i, uint8 pixels [C, S, S] or None, reason). JPEGs at least twice the model's
    size are decoded at a reduced scale (`Image.draft`), unless `exact_decode`."""

    def __init__(self, items: Sequence[ImageItem | Image.Image], model: CLIP, exact_decode: bool = False,
                 max_pixels: int = MAX_PIXELS):
        self.items, self.resize = items, model.preprocessing.resize
        self.draft_size = None if exact_decode else model.config.vision.image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        item = self.items[i]
        if isinstance(item, Image.Image):
            return i, self.resize(item if item.mode in ("RGB", "L") else item.convert("RGB")), ""
        try:
            data = item.read()
            if not data:
                raise ImageError(f"{item.id}: empty (0 bytes)")
            return i, self.resize(decode_image(data, item.id, self.max_pixels, self.draft_size)), ""
        except OSError as e:
            return i, None, f"unreadable ({e.strerror or e})"
        except ImageError as e:
            return i, None, str(e).removeprefix(f"{item.id}: ")


def _collate(rows: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, p) for i, p, _ in rows if p is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, [(i, why) for i, p, why in rows if p is None]


def _as_items(images: Sequence[str | os.PathLike | Image.Image] | str | os.PathLike | Image.Image) -> list:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    return [im if isinstance(im, Image.Image) else ImageItem(str(im), str(im)) for im in images]


@dataclass
class Embedded:
    """Embeddings [K, D] of the readable inputs; `kept` their positions in the input list, and
    `failed` (position, reason) for the others."""
    embeddings: torch.Tensor
    kept: list[int]
    failed: list[tuple[int, str]]


@torch.inference_mode()
def embed_items(model: CLIP, items: Sequence[ImageItem | Image.Image], batch_size: int = 64, workers: int = 0,
                exact_decode: bool = False, progress: bool = False) -> Embedded:
    """Embed images, skipping unreadable ones; decoding runs in `workers` processes (0: this one)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers: must be >= 0, got {workers}")
    dataset = ImageFiles(items, model, exact_decode)
    order = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    loader = DataLoader(dataset, batch_sampler=order, num_workers=min(workers, len(order)), collate_fn=_collate,
                        prefetch_factor=4 if workers and order else None)
    normalize, device = model.preprocessing.normalize, model.device
    parts, kept, failed = [], [], []
    with Progress(len(items), "embed", "img", disable=not progress) as bar:
        for index, pixels, bad in loader:
            if pixels is not None:
                parts.append(model.encode_image(normalize(pixels).to(device), normalize=True).float().cpu())
            kept += index
            failed += bad
            bar.update(len(index) + len(bad))
    emb = torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)
    return Embedded(emb, kept, failed)


def embed_images(model: CLIP, images, batch_size: int = 64, workers: int = 0, to_numpy: bool = True,
                 exact_decode: bool = False, progress: bool = False) -> np.ndarray | torch.Tensor:
    """L2-normalised float32 embeddings [N, D] of PIL images or image paths, in input order.
    An unreadable path raises ImageError naming it (`embed_items` skips them instead)."""
    items = _as_items(images)
    result = embed_items(model, items, batch_size, workers, exact_decode, progress)
    if result.failed:
        i, why = result.failed[0]
        raise ImageError(f"{items[i].id}: {why}")
    return result.embeddings.numpy() if to_numpy else result.embeddings


@torch.inference_mode()
def embed_texts(model: CLIP, texts: str | Sequence[str], batch_size: int = 256,
                to_numpy: bool = True) -> np.ndarray | torch.Tensor:
    """L2-normalised float32 embeddings [N, D] of texts. Each batch is computed only up to its
    longest text (the causal tower's end-of-text output does not depend on what follows)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
    tokenizer, device = model.tokenizer, model.device
    parts = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
             for i in range(0, len(texts), batch_size)]
    out = torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)
    return out.numpy() if to_numpy else out


def label_embeddings(model: CLIP, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
    """[C, D]: per label, the mean of its normalised template embeddings, re-normalised."""
    labels, templates = list(labels), check_templates(templates or DEFAULT_TEMPLATES)
    if not labels:
        raise ConfigError("labels: give at least one label")
    emb = embed_texts(model, [t.format(c) for c in labels for t in templates], to_numpy=False)
    return torch.nn.functional.normalize(emb.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)


@dataclass
class Classification:
    """probs [N, C] over the labels; top[n] = [(label, probability), ...] best first."""
    probs: np.ndarray
    top: list[list[tuple[str, float]]]


def classify_embeddings(model: CLIP, image_emb: torch.Tensor, labels: Sequence[str],
                        templates: Sequence[str] | None = None, k: int = 5) -> Classification:
    classes = label_embeddings(model, labels, templates)
    scale = model.scale().item()
    probs = (scale * image_emb.float() @ classes.T).softmax(dim=-1)
    values, index = probs.topk(min(k, len(labels)), dim=-1)
    top = [[(labels[j], p) for j, p in zip(row_i, row_v)] for row_i, row_v in zip(index.tolist(), values.tolist())]
    return Classification(probs.numpy(), top)


def classify(model: CLIP, images, labels: Sequence[str], templates: Sequence[str] | None = None, k: int = 5,
             batch_size: int = 64, workers: int = 0) -> Classification:
    """Zero-shot classification of images (PIL or paths) among `labels` made into prompts by
    `templates` (default "a photo of a {}."; several are averaged)."""
    emb = embed_images(model, images, batch_size=batch_size, workers=workers, to_numpy=False)
    return classify_embeddings(model, emb, list(labels), templates, k)
