"""transformers' `idefics3` (SmolVLM-256M/500M/2.2B) and `smolvlm` (SmolVLM2) folders as a clipper
VLM: the SigLIP tower's last layer after its post-layernorm, the pixel shuffle of the connector
(scale_factor), its linear projection, and the text model as a causal LM. Images are split into
tiles plus the global image (processor.TiledImageProcessor), each frame `image_seq_len` tokens."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import io
from ..errors import CheckpointError, ConfigError
from .folder import CONFIG, folder_weights, generation_settings, image_tower, language_model
from ..model.decoders.language import _transformers
from .model import VLM, VLMConfig
from .processor import ChatProcessor
from ..model.decoders.projector import LinearProjector

# the folder's prefixes -> (the part, the prefix its loader reads)
_PARTS = {"model.vision_model.": ("vision", "vision_model."), "model.connector.modality_projection.": ("projector", ""),
          "model.text_model.": ("language", "model.")}


def _full_config(folder: Path) -> dict:
    """config.json with transformers' defaults filled in (its own config classes)."""
    io.read_json_object(folder / CONFIG, "transformers model config", {})  # a one-line error for a bad file
    try:
        return _transformers().AutoConfig.from_pretrained(str(folder)).to_dict()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{folder / CONFIG}: not an Idefics3 / SmolVLM config ({str(e).splitlines()[0]})") from None


def grid_positions(grid: int) -> torch.Tensor:
    """The position ids Idefics3's tower gives a full grid x grid image: fractional coordinates
    bucketed in float32, which for some grids (19, 25, 29, ...) are not 0..grid-1."""
    coords = (torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor(grid))).clamp(max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, torch.arange(1 / grid, 1.0, 1 / grid), right=True)
    return (buckets[:, None] * grid + buckets[None, :]).flatten()


def load_idefics3(path: str | os.PathLike, native_lm: bool = True) -> VLM:
    """The folder as a VLM; `native_lm` False: the language model in transformers' module even
    where clipper's own runs it (the comparison benchmarks/vlm.py makes)."""
    folder = Path(path)
    where = str(folder / CONFIG)
    hf = _full_config(folder)
    vc, tc = hf.get("vision_config"), hf.get("text_config")
    if not isinstance(vc, dict) or not isinstance(tc, dict):
        raise ConfigError(f"{where}: no vision_config / text_config")
    scale, image_token_id = hf.get("scale_factor", 2), hf.get("image_token_id")
    if not isinstance(scale, int) or scale < 1 or not isinstance(image_token_id, int):
        raise ConfigError(f"{where}: scale_factor must be a positive integer and image_token_id an id, "
                          f"got {scale!r} and {image_token_id!r}")

    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "language": {}}
    for key, value in folder_weights(folder).items():
        prefix = next((p for p in _PARTS if key.startswith(p)), None)
        if prefix is not None:
            part, renamed = _PARTS[prefix]
            parts[part][renamed + key[len(prefix):]] = value
        elif key == "lm_head.weight":
            parts["language"][key] = value
        else:
            raise CheckpointError(f"{folder}: tensor {key} has no place in an Idefics3 model")

    vision = image_tower(vc, "siglip", parts["vision"], folder, f"{where}: vision_config")
    grid = vision.cfg.grid
    if grid % scale:
        raise ConfigError(f"{where}: a {grid} x {grid} patch grid does not pixel-shuffle by scale_factor {scale}")
    positions = grid_positions(grid)
    if not torch.equal(positions, torch.arange(grid * grid)):  # the tower's own order of its positions
        vision.positional_embedding = torch.nn.Parameter(vision.positional_embedding.detach()[positions])
    projector = LinearProjector(vision.cfg.width * scale * scale, int(tc.get("hidden_size", 0)))
    try:
        projector.load_state_dict(parts["projector"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: the connector's weights do not fit ({str(e).splitlines()[0]})") from None
    language = language_model(tc, parts["language"], folder, where, bool(hf.get("tie_word_embeddings")), native_lm)

    tokens = grid * grid // (scale * scale)
    processor = ChatProcessor.from_folder(folder, tokens, tiled=True)
    seq_len = processor.settings.get("image_seq_len", tokens)
    if seq_len != tokens:
        raise ConfigError(f"{folder / 'processor_config.json'}: image_seq_len {seq_len}, the "
                          f"model makes {tokens} tokens per frame")
    if processor.images.tile != vision.cfg.image_size:
        raise ConfigError(f"{folder}: the processor's tiles are {processor.images.tile} px, the image tower "
                          f"takes {vision.cfg.image_size} px")
    if processor.image_token_id != image_token_id:
        raise ConfigError(f"{folder}: the tokenizer's image token {processor.image_token!r} is id "
                          f"{processor.image_token_id}, the config says {image_token_id}")
    end_ids, generation = generation_settings(folder, tc)
    config = VLMConfig(kind=hf.get("model_type", "idefics3"), feature_layers=[-1], select="full",
                       image_token_id=image_token_id, end_ids=end_ids, post_norm=True, shuffle=scale,
                       generation=generation)
    return VLM(config, vision, projector, language, processor).eval()
