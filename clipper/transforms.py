"""A model's own image preprocessing (open_clip's eval transform: shortest-side bicubic resize,
centre crop, the model's channel count, normalisation)."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from .config import VisionConfig


def eval_transform(cfg: VisionConfig) -> Callable[[Image.Image], torch.Tensor]:
    mode = "L" if cfg.in_channels == 1 else "RGB"
    return T.Compose([
        T.Resize(cfg.image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(cfg.image_size),
        lambda im: im.convert(mode),
        T.ToTensor(),
        T.Normalize(cfg.image_mean, cfg.image_std),
    ])
