"""Vision-language models: an image tower, a projector and a pretrained causal language model
(LLaVA), run by clipper's generation engine. `clipper.load(DIR)` returns a `VLM` for such a folder."""

from __future__ import annotations

import os

from ..interop.hf import model_type
from .model import VLM, VLMConfig

VLM_KINDS = ("llava",)  # config.json model_type of the folders clipper runs as VLMs


def vlm_kind(path: str | os.PathLike) -> str | None:
    """The model_type of a transformers VLM folder clipper runs, else None."""
    kind = model_type(path)
    return kind if kind in VLM_KINDS else None


def load_vlm(path: str | os.PathLike) -> VLM:
    from .llava import load_llava

    return load_llava(path)


__all__ = ["VLM", "VLMConfig", "VLM_KINDS", "load_vlm", "vlm_kind"]
