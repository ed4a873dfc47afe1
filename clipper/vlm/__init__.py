"""Vision-language models: an image tower, a projector and a pretrained causal language model
(LLaVA; Idefics3 / SmolVLM), run by clipper's generation engine. `clipper.load(DIR)` returns a
`VLM` for such a folder."""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..interop.hf import model_type
from .idefics3 import load_idefics3
from .llava import llava_of_model, load_llava
from .model import VLM, VLMConfig

# config.json model_type of the folders clipper runs as VLMs -> its loader
_LOADERS = {"llava": load_llava, "idefics3": load_idefics3, "smolvlm": load_idefics3}
VLM_KINDS = tuple(_LOADERS)


def vlm_kind(path: str | os.PathLike) -> str | None:
    """The model_type of a transformers VLM folder clipper runs, else None."""
    kind = model_type(path)
    return kind if kind in VLM_KINDS else None


def as_vlm(model) -> VLM | None:
    """`model` if it is a VLM; a clipper model with a llava decoder as one; else None."""
    if isinstance(model, VLM):
        return model
    decoder = getattr(model, "decoder", None)
    return llava_of_model(model) if decoder is not None and model.config.decoder.kind == "llava" else None


def load_vlm(path: str | os.PathLike, native_lm: bool = True) -> VLM:
    """The VLM of a transformers folder (`native_lm`: see llava.load_llava)."""
    kind = vlm_kind(path)
    if kind is None:
        raise ConfigError(f"{path}: not a vision-language model folder clipper runs ({', '.join(VLM_KINDS)})")
    return _LOADERS[kind](path, native_lm)


__all__ = ["VLM", "VLMConfig", "VLM_KINDS", "as_vlm", "load_vlm", "vlm_kind"]
