"""A VLM's inputs as its transformers processor makes them: the folder's chat template rendered by
its tokenizer, each image token expanded to the image's feature count, and the pixels of the
folder's image processor (transformers' default torchvision path: uint8 resize with antialias, a
centre crop that rounds down, rescale and normalise fused), so that ids and pixels are identical."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TVF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .. import io
from ..config import OPENAI_MEAN, OPENAI_STD
from ..errors import ConfigError
from ..data.transforms import uint8_tensor

_RESAMPLE = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}


@dataclass
class ImageProcessor:
    """preprocessor_config.json's CLIPImageProcessor / SiglipImageProcessor settings."""
    size: dict
    crop_size: dict | None = None
    resample: int = 3
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD
    do_resize: bool = True
    do_center_crop: bool = False
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageProcessor":
        path = folder / "preprocessor_config.json"
        if path.is_file():
            p = io.read_json_object(path, "image processor config", {})
        else:  # transformers 5 keeps it in the processor's config
            path = folder / "processor_config.json"
            p = io.read_json_object(path, "processor config", {}).get("image_processor") if path.is_file() else None
            if not isinstance(p, dict):
                raise ConfigError(f"{folder}: no image processor settings (preprocessor_config.json, or "
                                  "processor_config.json's image_processor)")
        fields = {k: p[k] for k in ("size", "crop_size", "resample", "rescale_factor", "do_resize", "do_center_crop",
                                    "do_rescale", "do_normalize") if p.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if p.get(k) is not None:
                fields[k] = tuple(float(x) for x in (p[k] if isinstance(p[k], list) else [p[k]] * 3))
        out = cls(**fields)
        if out.resample not in _RESAMPLE or not isinstance(out.size, dict) or not (
                "shortest_edge" in out.size or {"height", "width"} <= set(out.size)):
            raise ConfigError(f"{path}: size must be {{shortest_edge}} or {{height, width}} and resample one of "
                              f"{sorted(_RESAMPLE)}, got {out.size} and {out.resample}")
        return out

    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop and self.crop_size:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        raise ConfigError("image processor: a shortest-edge resize without a centre crop gives images of "
                          "varying shape, which this VLM cannot take")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 [3, H, W]."""
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
        x = x.to(torch.float32)
        if self.do_rescale and self.do_normalize:  # fused as transformers does: mean and std in 0-255 units
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return TVF.normalize(x, mean.tolist(), std.tolist())
        if self.do_rescale:
            x = x * self.rescale_factor
        return TVF.normalize(x, list(self.image_mean), list(self.image_std)) if self.do_normalize else x


def chat_template(folder: Path, tokenizer) -> str:
    """The folder's chat template: chat_template.jinja, chat_template.json, else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        template = io.read_json_object(folder / "chat_template.json", "chat template", {}).get("chat_template")
        if isinstance(template, str):
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise ConfigError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


class ChatProcessor:
    """Messages -> the prompt ids the language model reads; ids -> text."""

    def __init__(self, folder: Path, tokenizer, template: str, image_token: str, tokens_per_image: int,
                 images: ImageProcessor):
        self.folder, self.tokenizer, self.template = folder, tokenizer, template
        self.image_token, self.tokens_per_image, self.images = image_token, tokens_per_image, images
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"{folder}: the tokenizer does not hold the image token {image_token!r} as one token")
        self.image_token_id = ids[0]

    @classmethod
    def from_folder(cls, folder: Path, tokens_per_image: int, image_token: str = "<image>") -> "ChatProcessor":
        from .language import _transformers

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
        token = settings.get("image_token") or getattr(tokenizer, "image_token", None) or image_token
        return cls(folder, tokenizer, chat_template(folder, tokenizer), token, tokens_per_image,
                   ImageProcessor.from_folder(folder))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, images: int) -> list[int]:
        """The ids of a rendered prompt holding `images` image tokens, each expanded to the image's
        feature count (as the processor's __call__: the tokenizer's special tokens added)."""
        found = text.count(self.image_token)
        if found != images:
            raise ConfigError(f"prompt: {found} image token(s) {self.image_token!r} for {images} image(s)")
        expanded = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        return self.tokenizer(expanded, add_special_tokens=True)["input_ids"]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.images(im) for im in images])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def user_message(prompt: str, images: int = 1) -> dict:
    """One user turn in the processors' content-list form: the images first, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}
