"""A VLM's inputs as its transformers processor makes them: the folder's chat template rendered by
its tokenizer, each image token expanded to the text of the image's features, and the pixels of
the folder's image processor (transformers' default torchvision path: uint8 resizes with
antialias, a centre crop that rounds down, rescale and normalise fused), so that ids and pixels
are identical. LLaVA's images are one fixed-size frame (`ImageProcessor`); Idefics3's and
SmolVLM's are tiles plus the global image (`TiledImageProcessor`), each frame's tokens behind its
row/column tag."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TVF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .. import io
from ..config import OPENAI_MEAN, OPENAI_STD
from ..errors import ConfigError
from ..data.transforms import uint8_tensor
from ..model.decoders.chat import ChatText, ImageText, chat_template

# PIL's resample codes, as transformers maps them (LANCZOS runs in torchvision >= 0.27 on the CPU)
_RESAMPLE = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
             3: InterpolationMode.BICUBIC}
MAX_SIDE = 4096  # transformers' bound on a resized image's side (Idefics3)


def _settings(folder: Path) -> tuple[dict, Path]:
    """The folder's image processor settings: preprocessor_config.json, else (transformers 5)
    processor_config.json's image_processor."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        return io.read_json_object(path, "image processor config", {}), path
    path = folder / "processor_config.json"
    p = io.read_json_object(path, "processor config", {}).get("image_processor") if path.is_file() else None
    if not isinstance(p, dict):
        raise ConfigError(f"{folder}: no image processor settings (preprocessor_config.json, or "
                          "processor_config.json's image_processor)")
    return p, path


@dataclass(kw_only=True)
class _Pixels:
    """What both image processors share: resampling, and rescale and normalisation as
    transformers does them (fused: mean and std in 0-255 units)."""
    resample: int = 3
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def _read(cls, folder: Path):
        """(the folder's settings as this class, the file they came from)."""
        p, path = _settings(folder)
        values = {f.name: p[f.name] for f in fields(cls) if p.get(f.name) is not None}
        for k in ("image_mean", "image_std"):
            if k in values:
                values[k] = tuple(float(x) for x in (p[k] if isinstance(p[k], list) else [p[k]] * 3))
        try:
            return cls(**values), path
        except TypeError as e:  # a required setting missing
            raise ConfigError(f"{path}: {e}") from None

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float32, rescaled and normalised."""
        x = x.to(torch.float32)
        if self.do_rescale and self.do_normalize:
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return TVF.normalize(x, mean.tolist(), std.tolist())
        if self.do_rescale:
            x = x * self.rescale_factor
        return TVF.normalize(x, list(self.image_mean), list(self.image_std)) if self.do_normalize else x


@dataclass(kw_only=True)
class ImageProcessor(_Pixels):
    """preprocessor_config.json's CLIPImageProcessor / SiglipImageProcessor settings."""
    size: dict
    crop_size: dict | None = None
    do_center_crop: bool = False

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageProcessor":
        out, path = cls._read(folder)
        if out.resample not in _RESAMPLE or not isinstance(out.size, dict) or not (
                "shortest_edge" in out.size or {"height", "width"} <= set(out.size)):
            raise ConfigError(f"{path}: size must be {{shortest_edge}} or {{height, width}} and resample one of "
                              f"{sorted(_RESAMPLE)}, got {out.size} and {out.resample}")
        return out

    def frames(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 [1, 3, H, W]."""
        x = uint8_tensor(image, "RGB")
        if self.do_resize:
            if "shortest_edge" in self.size:
                edge, (h, w) = int(self.size["shortest_edge"]), x.shape[-2:]
                short, long = (h, w) if h <= w else (w, h)
                new_short, new_long = edge, int(edge * long / short)
                size = [new_short, new_long] if h <= w else [new_long, new_short]
            else:
                size = [int(self.size["height"]), int(self.size["width"])]
            x = TVF.resize(x, size, interpolation=_RESAMPLE[self.resample], antialias=True)
        if self.do_center_crop and self.crop_size:
            ch, cw = int(self.crop_size["height"]), int(self.crop_size["width"])
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                raise ConfigError(f"image processor: a {h}x{w} image is smaller than the {ch}x{cw} crop")
            x = x[..., int((h - ch) / 2.0):int((h - ch) / 2.0) + ch, int((w - cw) / 2.0):int((w - cw) / 2.0) + cw]
        return self._normalized(x)[None]

    def layout(self, image: Image.Image) -> tuple[int, int]:
        """(rows, columns) of tiles: none, one frame per image."""
        return 0, 0


@dataclass(kw_only=True)
class TiledImageProcessor(_Pixels):
    """Idefics3's / SmolVLM's image processor: the longest side resized to `size`, then to multiples
    of the tile side (`max_image_size`), cut into tiles row by row, and the whole image resized to
    one tile last (the global image); without splitting the image is squashed to one tile."""
    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict = field(default_factory=lambda: {"longest_edge": 364})
    resample: int = 1
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_image_splitting: bool = True

    @classmethod
    def from_folder(cls, folder: Path) -> "TiledImageProcessor":
        out, path = cls._read(folder)
        sides = (out.size.get("longest_edge"), out.max_image_size.get("longest_edge")) \
            if isinstance(out.size, dict) and isinstance(out.max_image_size, dict) else (None, None)
        if out.resample not in _RESAMPLE or not all(isinstance(v, int) and 0 < v <= MAX_SIDE for v in sides):
            raise ConfigError(f"{path}: size and max_image_size must be {{longest_edge}} of 1 to {MAX_SIDE} and "
                              f"resample one of {sorted(_RESAMPLE)}, got {out.size}, {out.max_image_size} and "
                              f"{out.resample}")
        return out

    @property
    def tile(self) -> int:
        return int(self.max_image_size["longest_edge"])

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        """The size after the first resize: the longest side to size's longest_edge (the other
        side rounded up to even), both kept within MAX_SIDE."""
        if not self.do_resize:
            return h, w
        side, aspect = int(self.size["longest_edge"]), w / h
        if w >= h:
            w, h = side, int(side / aspect)
            h += h % 2
        else:
            h, w = side, int(side * aspect)
            w += w % 2
        h, w = max(h, 1), max(w, 1)
        aspect = w / h
        if w >= h and w > MAX_SIDE:
            w, h = MAX_SIDE, int(MAX_SIDE / aspect)
        elif h > w and h > MAX_SIDE:
            h, w = MAX_SIDE, int(MAX_SIDE * aspect)
        return max(h, 1), max(w, 1)

    def _tiled(self, h: int, w: int) -> tuple[int, int]:
        """The size the tiles are cut from: each side rounded up to whole tiles (the longer one
        first, the shorter from it by the aspect ratio)."""
        t, aspect = self.tile, w / h
        if w >= h:
            w = math.ceil(w / t) * t
            h = math.ceil(int(w / aspect) / t) * t
        else:
            h = math.ceil(h / t) * t
            w = math.ceil(int(h * aspect) / t) * t
        return h, w

    def layout(self, image: Image.Image) -> tuple[int, int]:
        """(rows, columns) of tiles; (0, 0) for the global image alone."""
        if not self.do_image_splitting:
            return 0, 0
        h, w = self._tiled(*self._resized(image.height, image.width))
        return (h // self.tile, w // self.tile) if h > self.tile or w > self.tile else (0, 0)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return TVF.resize(x, list(size), interpolation=_RESAMPLE[self.resample], antialias=True)

    def frames(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 [tiles + 1 or 1, 3, tile, tile]: the tiles row by row, then the global image."""
        x = uint8_tensor(image, "RGB")
        if self.do_resize:
            x = self._resize(x, self._resized(*x.shape[-2:]))
        t = self.tile
        if not self.do_image_splitting:
            return self._normalized(self._resize(x, (t, t)))[None]
        x = self._resize(x, self._tiled(*x.shape[-2:]))
        h, w = x.shape[-2:]
        if h <= t and w <= t:
            return self._normalized(x)[None]
        tiles = x.unfold(1, t, t).unfold(2, t, t).permute(1, 2, 0, 3, 4).reshape(-1, 3, t, t)
        return self._normalized(torch.cat([tiles, self._resize(x, (t, t))[None]]))


class ModelImages:
    """A clipper model's own preprocessing as a VLM's image processor: one frame per image."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def frames(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)[None]

    def layout(self, image: Image.Image) -> tuple[int, int]:
        return 0, 0


class ChatProcessor(ChatText):
    """Messages -> the prompt ids the language model reads; images -> their frames; ids -> text."""

    def __init__(self, folder: Path, tokenizer, template: str, text: ImageText,
                 images: "ImageProcessor | TiledImageProcessor | ModelImages", settings: dict | None = None):
        super().__init__(folder, tokenizer, template, text)
        self.images = images
        self.settings = settings or {}  # processor_config.json

    @classmethod
    def from_folder(cls, folder: Path, tokens_per_frame: int, tiled: bool = False) -> "ChatProcessor":
        """The folder's tokenizer, chat template and image processor (`tiled`: Idefics3's)."""
        from ..model.decoders.language import _transformers

        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                break
        else:
            raise ConfigError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json)")
        try:
            tokenizer = _transformers().AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"{folder}: the tokenizer does not load ({str(e).splitlines()[0]})") from None
        settings = io.read_json_object(folder / "processor_config.json", "processor config", {}) \
            if (folder / "processor_config.json").is_file() else {}
        token = settings.get("image_token") or getattr(tokenizer, "image_token", None) or "<image>"
        if tiled:  # the tokenizer's names where it has them, as SmolVLM's processor
            text = ImageText(token, tokens_per_frame, getattr(tokenizer, "fake_image_token", None) or
                             "<fake_token_around_image>",
                             getattr(tokenizer, "global_image_token", None) or "<global-img>")
            images = TiledImageProcessor.from_folder(folder)
        else:
            text, images = ImageText(token, tokens_per_frame), ImageProcessor.from_folder(folder)
        return cls(folder, tokenizer, chat_template(folder, tokenizer), text, images, settings)

    def image_texts(self, images: Sequence[Image.Image]) -> list[str]:
        """What each image's token becomes in the prompt (from the images' sizes alone)."""
        return [self.text(*self.images.layout(im)) for im in images]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Every image's frames, in order [frames, 3, H, W]."""
        return torch.cat([self.images.frames(im) for im in images])
