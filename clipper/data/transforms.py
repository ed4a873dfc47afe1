"""Image transforms: the model's own eval preprocessing (open_clip's: shortest-side bicubic resize,
centre crop, normalise) and the train-time augmentation."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..config import VisionConfig
from ..train_config import AugmentConfig


def _mode(cfg: VisionConfig) -> str:
    return "L" if cfg.in_channels == 1 else "RGB"  # grayscale in a 3-channel model: channels repeat


class ResizeCrop:
    """PIL image -> uint8 tensor [C, S, S]: shortest side resized then a centre crop, or squashed to
    S x S (the model's `resize`), bicubic or bilinear, in the model's mode.

    Kept in uint8 so that decoding workers hand over a quarter of the bytes; `Normalize` finishes
    the job on whole batches.
    """

    def __init__(self, cfg: VisionConfig):
        self.size, self.mode, self.squash = cfg.image_size, _mode(cfg), cfg.resize == "squash"
        self.interpolation = T.InterpolationMode(cfg.interpolation)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        if self.squash:
            im = TF.resize(im, [self.size, self.size], self.interpolation)
        else:
            im = TF.center_crop(TF.resize(im, self.size, self.interpolation), self.size)
        return uint8_tensor(im, self.mode)


def uint8_tensor(im: Image.Image, mode: str) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W] in `mode`."""
    pixels = torch.from_numpy(np.array(im if im.mode == mode else im.convert(mode)))
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


class Normalize:
    """uint8 [..., C, H, W] -> float32 scaled to [0, 1] then standardised: the same arithmetic as
    torchvision's ToTensor + Normalize, so the numbers are identical."""

    def __init__(self, cfg: VisionConfig):
        self.mean = torch.tensor(cfg.image_mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.image_std).view(-1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)


class Preprocess:
    """A model's own preprocessing (open_clip's `preprocess`), in its two halves: `resize` (PIL ->
    uint8 [C, S, S], where images are decoded: workers hand over a quarter of the bytes) and
    `normalize` (uint8 batch -> float, standardised, on whole batches). Called on one image: both."""

    def __init__(self, cfg: VisionConfig):
        self.resize, self.normalize = ResizeCrop(cfg), Normalize(cfg)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(im))


class TrainTransform:
    """Random resized crop (+ optional flip and colour jitter) drawing from its own seeded RNG, so
    a data stream is reproducible whatever process runs it and whatever else uses torch's RNG.
    Returns uint8 [C, S, S], like ResizeCrop; `Normalize` finishes whole batches."""

    def __init__(self, cfg: VisionConfig, aug: AugmentConfig):
        self.size, self.aug, self.mode = cfg.image_size, aug, _mode(cfg)
        self.rng = random.Random(0)

    def reseed(self, seed: str) -> None:
        self.rng = random.Random(seed)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) as torchvision's RandomResizedCrop draws them."""
        area = width * height
        log_ratio = (math.log(self.aug.crop_ratio[0]), math.log(self.aug.crop_ratio[1]))
        for _ in range(10):
            target = area * self.rng.uniform(*self.aug.crop_scale)
            ratio = math.exp(self.rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        side = min(width, height)  # fall back to a centre crop
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, im: Image.Image) -> torch.Tensor:
        top, left, h, w = self._crop_box(im.width, im.height)
        im = TF.resized_crop(im, top, left, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        if self.aug.hflip > 0 and self.rng.random() < self.aug.hflip:
            im = TF.hflip(im)
        im = self._style_views(im)
        if self.aug.color_jitter > 0:
            j = self.aug.color_jitter
            im = TF.adjust_brightness(im, self.rng.uniform(1 - j, 1 + j))
            im = TF.adjust_contrast(im, self.rng.uniform(1 - j, 1 + j))
            if im.mode == "RGB":
                im = TF.adjust_saturation(im, self.rng.uniform(1 - j, 1 + j))
        return uint8_tensor(im, self.mode)

    def _happens(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def _style_views(self, im: Image.Image) -> Image.Image:
        """The style-removing views (issue #18), each with its probability: what stays is the shape
        and the parts of the thing, not one artist's palette, line weight or shading."""
        a = self.aug
        if a.rotate > 0:
            fill = (255,) * len(im.getbands())
            im = im.rotate(self.rng.uniform(-a.rotate, a.rotate), Image.Resampling.BICUBIC, fillcolor=fill)
        if self._happens(a.background) and im.mode == "RGB":  # near-white pixels take one colour
            paint = Image.new("RGB", im.size, tuple(self.rng.randrange(256) for _ in range(3)))
            white = im.convert("L").point(lambda v: 255 if v >= 245 else 0)
            im = Image.composite(paint, im, white)
        if self._happens(a.outline):  # padded with its corner's grey first: the frame is no edge
            gray = im.convert("L")
            edges = ImageOps.expand(gray, 1, fill=gray.getpixel((0, 0))).filter(ImageFilter.FIND_EDGES)
            edges = edges.crop((1, 1, gray.width + 1, gray.height + 1))
            im = ImageOps.invert(ImageOps.autocontrast(edges)).convert(im.mode)
        if self._happens(a.grayscale):
            im = im.convert("L").convert(im.mode)
        if a.hue > 0 and im.mode == "RGB":
            im = TF.adjust_hue(im, self.rng.uniform(-a.hue, a.hue))
        if self._happens(a.posterize):
            im = ImageOps.posterize(im, self.rng.randint(2, 4))
        if self._happens(a.blur):
            im = im.filter(ImageFilter.GaussianBlur(self.rng.uniform(0.5, 1.5)))
        if self._happens(a.shade):
            im = shade(im, self.rng.uniform(0, 2 * math.pi), self.rng.uniform(0.15, 0.45))
        return im


def shade(im: Image.Image, angle: float, strength: float) -> Image.Image:
    """A light from direction `angle`: the drawing's pixels scaled by 1 + strength x (their position
    along that direction, -1 .. 1 across the image); near-white pixels (the background) stay. Flat
    artists fill where glossy ones (Apple's, Facebook's) shade."""
    x = np.asarray(im, dtype=np.float32)
    h, w = x.shape[:2]
    ys, xs = np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32)
    light = 1 + strength * (xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle)) / math.sqrt(2)
    pixels = x if x.ndim == 2 else x.min(axis=-1)
    light = np.where(pixels < 245, light, 1)
    out = x * (light if x.ndim == 2 else light[..., None])
    return Image.fromarray(out.clip(0, 255).round().astype(np.uint8), im.mode)
