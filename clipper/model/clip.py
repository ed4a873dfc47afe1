"""CLIP: an image tower and a text tower projected into one space, with a learnable temperature."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import embed, generate
from ..checkpoint import load_weights, save_model
from ..chunks import chunked
from ..config import ModelConfig
from ..precision import autocast
from .decoders import build_decoder
from .meta import SkipMetaInit
from .hf_text import HFTextTower
from .inputs import ModelInputs
from .text import TextTransformer
from .vision import VISION_TOWERS

MAX_LOGIT_SCALE = 100.0
TEXT_TOWERS = {"clipper": TextTransformer, "hf": HFTextTower}  # TextConfig.kind -> the tower


class CLIP(ModelInputs, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.visual = VISION_TOWERS[config.vision.kind](config.vision, config.embed_dim, config.quick_gelu)
        self.text = TEXT_TOWERS[config.text.kind](config.text, config.embed_dim, config.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        if self.logit_scale.is_meta:  # built for its shapes (weights loaded next): no init to run
            with SkipMetaInit():
                self.init_weights()
        else:
            self.init_weights()
        self.precision = "fp32"  # inference: "bf16" runs under bf16 autocast (clipper.precision), "int8" quantised
        self.decoder = None
        if config.decoder is not None:
            self.add_decoder(config.decoder)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, torch.Tensor], source: str = "weights") -> "CLIP":
        """A CLIP of `config` holding `sd` (adopted, not copied), built without a random init first."""
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, sd, source)
        return model

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def fingerprint(self) -> str:
        """A digest of the architecture and the weights (each tensor's name, shape, dtype and 4,096
        of its values, evenly spaced): tells one model's embeddings from another's without reading
        every byte (milliseconds for a ViT-B)."""
        architecture = {k: v for k, v in self.config.to_dict().items() if k != "classnames"}  # labels embed nothing
        h = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
        for name, t in self.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    def scale(self) -> torch.Tensor:
        """The temperature the logits are multiplied by: exp(logit_scale), at most MAX_LOGIT_SCALE."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def add_decoder(self, cfg) -> None:
        """Attach a (freshly initialised) captioner on the image tower's tokens."""
        self.config.decoder = cfg
        self.config.validate()
        self.decoder = build_decoder(self.config)

    def captioner(self):
        """What the generation engine drives (`clipper.generate`): prefill, decode, vocabulary."""
        return self.decoder.captioner(self.text)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Each tower's own init (open_clip's), the text tower's blocks last: the order in which the
        random weights of every earlier clipper model were drawn, so seeded runs stay the same."""
        self.text.init_weights()
        self.visual.init_weights()
        self.text.init_blocks()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the model's inference precision (`precision.autocast`: bf16 where native)."""
        return autocast(self.precision, self.device)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with self.autocast():
            features = chunked(self.visual, images)
        if self.precision == "bf16":  # normalised and returned in float32
            features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # Identical captions are encoded once (templated data and class prompts repeat a lot);
        # the features are the same, and gradients of the copies add up in the shared row.
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        with self.autocast():
            features = (chunked(self.text, unique)[inverse] if unique.shape[0] < tokens.shape[0]
                        else chunked(self.text, tokens))
        if self.precision == "bf16":
            features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Normalised features of both towers, and the temperature (and bias) the losses use."""
        return {
            "image_features": self.encode_image(images, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.scale(),
            "logit_bias": self.logit_bias,
        }

    # The user-facing verbs: `clipper.embed` and `clipper.generate` do the work, on any model.
    def embed_images(self, images, batch_size: int = 64, **kwargs):
        """Normalised float32 embeddings of PIL images or paths: see `clipper.embed.embed_images`."""
        return embed.embed_images(self, images, batch_size=batch_size, **kwargs)

    def embed_texts(self, texts, batch_size: int = 256, **kwargs):
        """Normalised float32 embeddings of texts: see `clipper.embed.embed_texts`."""
        return embed.embed_texts(self, texts, batch_size=batch_size, **kwargs)

    def classify(self, images, labels, templates=None, k: int = 5, **kwargs):
        """Zero-shot probabilities over `labels` and the top k: see `clipper.embed.classify`."""
        return embed.classify(self, images, labels, templates, k, **kwargs)

    def caption(self, images, prompt=None, **kwargs):
        """Captions of PIL images or paths: see `clipper.generate.caption`."""
        return generate.caption(self, images, prompt, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write a model directory (config.json + model.safetensors), atomically."""
        save_model(self, path)
