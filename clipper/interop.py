"""open_clip <-> clipper weights for open_clip's ViT + text-transformer `CLIP` models.

Both use the same tensors under different names (open_clip's packed `in_proj` is our `qkv`),
so conversion is a renaming, exact in both directions.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import read_state_dict
from .config import ModelConfig, TextConfig, VisionConfig
from .errors import CheckpointError
from .io import atomic_path
from .model import CLIP
from .errors import ConfigError

# (clipper pattern, open_clip pattern); block indices carry over as \1.
_RULES = [
    (r"visual\.patch_embed\.weight", r"visual.conv1.weight"),
    (r"visual\.transformer\.blocks\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"text\.transformer\.blocks\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"text\.proj$", r"text_projection"),
    (r"text\.", r""),
]
_BLOCK_RULES = [
    (r"attn\.qkv\.", r"attn.in_proj_"),
    (r"attn\.out\.", r"attn.out_proj."),
    (r"mlp\.fc\.", r"mlp.c_fc."),
    (r"mlp\.proj\.", r"mlp.c_proj."),
]
# Entries of OpenAI/open_clip files that are not weights.
_NON_WEIGHTS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}


def open_clip_name(key: str) -> str:
    """open_clip's name for the clipper parameter `key`."""
    in_block = ".blocks." in key
    for pattern, repl in _RULES:
        key, n = re.subn("^" + pattern, repl, key)
        if n:
            break
    if in_block:
        for pattern, repl in _BLOCK_RULES:
            key = re.sub(pattern, repl, key)
    return key


def _key_map(model: CLIP) -> dict[str, str]:
    """{open_clip name: clipper name} for every tensor of `model`."""
    return {open_clip_name(k): k for k in model.state_dict()}


def to_open_clip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The state dict that open_clip's CLIP of the same config loads with strict=True (a
    captioner's decoder has no open_clip counterpart and is left out)."""
    if model.config.text.pool != "eot":
        raise ConfigError(f"text.pool {model.config.text.pool!r}: open_clip's CLIP pools the end-of-text "
                         "token of a causal text tower; this model cannot be exported to it")
    return {open_clip_name(k): v for k, v in model.state_dict().items() if not k.startswith("decoder.")}


def config_from_open_clip_state_dict(sd: dict[str, torch.Tensor], quick_gelu: bool = False,
                                     head_width: int = 64) -> ModelConfig:
    """Infer the architecture from tensor shapes (heads assume open_clip's 64-wide heads)."""
    try:
        conv = sd["visual.conv1.weight"]
        width, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        t_width = sd["ln_final.weight"].shape[0]
        v_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        t_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        return ModelConfig(
            embed_dim=sd["text_projection"].shape[1],
            vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=v_layers,
                                heads=max(1, width // head_width), in_channels=in_channels,
                                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                                **({} if in_channels == 3 else {"image_mean": (0.5,) * in_channels,
                                                                 "image_std": (0.5,) * in_channels})),
            text=TextConfig(context_length=sd["positional_embedding"].shape[0],
                            vocab_size=sd["token_embedding.weight"].shape[0], width=t_width, layers=t_layers,
                            heads=max(1, t_width // head_width),
                            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width),
            quick_gelu=quick_gelu,
            init_logit_bias=float(sd["logit_bias"]) if "logit_bias" in sd else None,
        ).validate()
    except KeyError as e:
        raise CheckpointError(f"not an open_clip ViT CLIP state dict: no {e.args[0]!r}") from None


def from_open_clip_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig | None = None,
                              source: str = "open_clip state dict", copy: bool = True) -> CLIP:
    """A clipper CLIP holding the weights of an open_clip CLIP state dict (copied, so that the two
    models do not share storage; `copy=False` adopts tensors that nothing else holds)."""
    sd = {k: v for k, v in sd.items() if k not in _NON_WEIGHTS}
    if config is None:
        config = config_from_open_clip_state_dict(sd)
    if config.init_logit_bias is None and "logit_bias" in sd:
        config.init_logit_bias = float(sd["logit_bias"])
    with torch.device("meta"):
        names = _key_map(CLIP(config))
    unknown = sorted(set(sd) - set(names))
    if unknown:
        raise CheckpointError(f"{source}: tensors clipper cannot place (not a ViT CLIP of this config?): "
                              f"{', '.join(unknown[:5])}")
    # open_clip stores logit_scale as a scalar or as shape [1]; clipper uses a scalar.
    tensors = {names[k]: (v.reshape(()) if k.startswith("logit_") else v) for k, v in sd.items()}
    return CLIP.from_state_dict(config, {k: v.clone() for k, v in tensors.items()} if copy else tensors, source)


def is_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in sd


def load_open_clip_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None,
                              quick_gelu: bool = False) -> CLIP:
    """A clipper CLIP from an open_clip checkpoint file (.pt, .pth, .bin, .safetensors)."""
    sd = read_state_dict(path)
    if not is_open_clip_state_dict(sd):
        raise CheckpointError(f"{path}: not an open_clip ViT CLIP checkpoint (no visual.conv1.weight)")
    if config is None:
        try:
            config = config_from_open_clip_state_dict(sd, quick_gelu=quick_gelu)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return from_open_clip_state_dict(sd, config, source=str(path), copy=False)


def save_open_clip_checkpoint(model: CLIP, path: str | os.PathLike) -> Path:
    """Write the open_clip state dict to `path` (.safetensors, else a torch file), atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in to_open_clip_state_dict(model).items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
    return path
