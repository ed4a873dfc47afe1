"""What every transformers VLM folder clipper loads shares: its safetensors (one file or shards),
its SigLIP / CLIP image tower as clipper's ViT, its language model, and generation_config.json's
end tokens and settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import io
from ..checkpoint import read_state_dict
from ..errors import CheckpointError, ConfigError
from ..generate import GenerationConfig
from ..interop.hf import from_hf_state_dict, vision_config_from_hf
from ..model.vision import VisionTransformer
from ..model.decoders.language import LanguageModel, text_config
from ..model.decoders.llama import LlamaLM, native_supported

CONFIG = "config.json"


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (one file or the shards model.safetensors.index.json
    lists), read weights-only."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = io.read_json_object(index, "safetensors index", {"weight_map": dict})["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name or not (folder / name).is_file():
                raise CheckpointError(f"{index}: names a shard {name!r} that is not a file in the folder")
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(read_state_dict(folder / name))
    return sd


def image_tower(vc: dict, kind: str, sd: dict[str, torch.Tensor], folder: Path, where: str) -> VisionTransformer:
    """clipper's ViT of a transformers CLIP / SigLIP vision config (`kind`) and its weights under
    transformers' names (`vision_model.*`), without projection; a SigLIP tower saved without its
    pooling head pools by the mean (unused by a VLM)."""
    cfg = vision_config_from_hf(vc, kind, where)
    visual = {k[len("visual."):]: v for k, v in from_hf_state_dict(sd, kind, str(folder)).items()}
    if kind == "siglip" and not any(k.startswith("map_pool.") for k in visual):
        cfg.pool = "avg"
    cfg.projection = False  # a VLM's tower has no projection
    with torch.device("meta"):
        tower = VisionTransformer(cfg, cfg.width)
    missing = sorted(set(tower.state_dict()) - set(visual))
    if missing:
        raise CheckpointError(f"{folder}: the image tower lacks {len(missing)} tensors, e.g. {missing[:2]}")
    tower.load_state_dict({k: v for k, v in visual.items() if k in tower.state_dict()}, strict=True, assign=True)
    return tower


def language_model(tc: dict, sd: dict[str, torch.Tensor], folder: Path, where: str, tied: bool,
                   native: bool = True) -> LanguageModel | LlamaLM:
    """The causal LM of `text_config` with its weights (`*ForCausalLM` names): clipper's own where
    it runs the model (`native`, the Llama family), else transformers' module."""
    config = text_config(tc, f"{where}: text_config")
    with torch.device("meta"):
        language = LlamaLM(config) if native and native_supported(config) else \
            LanguageModel(config, f"{where}: text_config")
    language.load_weights(sd, str(folder), tied=tied)
    return language


def generation_settings(folder: Path, tc: dict) -> tuple[tuple[int, ...], dict]:
    """(end token ids, the GenerationConfig settings the folder sets) from generation_config.json,
    else the text config's eos_token_id."""
    path = folder / "generation_config.json"
    generation = io.read_json_object(path, "generation config", {}) if path.is_file() else {}
    eos = generation.get("eos_token_id", tc.get("eos_token_id"))
    end_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    if not end_ids or not all(isinstance(i, int) for i in end_ids):
        raise ConfigError(f"{folder}: no end token (generation_config.json or text_config eos_token_id)")
    names = {f.name for f in dataclasses.fields(GenerationConfig)} - {"max_new_tokens", "use_cache", "seed"}
    return end_ids, {k: v for k, v in generation.items() if k in names and v is not None}
