"""Image transforms: the model's own eval preprocessing (open_clip's: shortest-side bicubic resize,
centre crop, normalise) and the train-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from ..config import VisionConfig


@dataclass
class AugmentConfig:
    """Train-time augmentation. Defaults are mild: small crops keep the object the caption names."""
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect ratio range of the crop
    hflip: float = 0.0  # probability; off by default since captions may say left or right
    color_jitter: float = 0.0  # brightness/contrast/saturation strength


class ConvertMode:
    """PIL mode conversion as a picklable step (DataLoader workers may be spawned)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, im: Image.Image) -> Image.Image:
        return im if im.mode == self.mode else im.convert(self.mode)


def _to_model_input(cfg: VisionConfig) -> list[Callable]:
    mode = "L" if cfg.in_channels == 1 else "RGB"  # grayscale in a 3-channel model: channels repeat
    return [ConvertMode(mode), T.ToTensor(), T.Normalize(cfg.image_mean, cfg.image_std)]


def eval_transform(cfg: VisionConfig) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose([T.Resize(cfg.image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(cfg.image_size), *_to_model_input(cfg)])


def train_transform(cfg: VisionConfig, aug: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    steps: list[Callable] = [T.RandomResizedCrop(cfg.image_size, scale=aug.crop_scale, ratio=aug.crop_ratio,
                                                 interpolation=T.InterpolationMode.BICUBIC)]
    if aug.hflip > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    return T.Compose([*steps, *_to_model_input(cfg)])
