"""What a model's encoders take, made in one place for every model kind (clipper's own, an ONNX
export on ONNX Runtime) and every verb: pixels through the model's `preprocessing`, token ids
through its `tokenizer`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..images import open_image
from ..tokenizer import HFTokenizer, Tokenizer, tokenizer_for

if TYPE_CHECKING:
    from ..data.transforms import Preprocess


class ModelInputs:
    """A mixin for a model with `config` (a ModelConfig) and `device`."""

    @property
    def tokenizer(self) -> Tokenizer | HFTokenizer:
        """The text tower's tokenizer (CLIP's BPE, or the Hugging Face one its config names)."""
        return tokenizer_for(self.config.text)

    @property
    def preprocessing(self) -> "Preprocess":
        """The image tower's resize and normalisation."""
        from ..data.transforms import Preprocess  # torchvision: ~1 s to import, which `clipper --help` need not pay

        return Preprocess(self.config.vision)

    def preprocess(self, images) -> torch.Tensor:
        """[N, C, S, S] float pixels for `encode_image` from PIL images or image paths: the model's
        resize, crop, mode and mean/std (open_clip's `preprocess`, on a list)."""
        pre = self.preprocessing
        images = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
        return pre.normalize(torch.stack([pre.resize(im) for im in images])).to(self.device)

    def tokenize(self, texts) -> torch.Tensor:
        """[N, context_length] token ids for `encode_text`, with the model's tokenizer."""
        return self.tokenizer(list(texts)).to(self.device)
