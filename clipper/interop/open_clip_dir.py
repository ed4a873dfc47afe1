"""open_clip's local-dir model layout: `open_clip_config.json` (model and preprocess configs) and
`open_clip_model.safetensors`, which `open_clip.create_model_and_transforms("local-dir:DIR")` and
clip_benchmark (`--model local-dir:DIR`) load as they are; clipper writes and reads it.

open_clip's image towers take 3 channels. A 1-channel (grayscale) tower is written as a 3-channel
one whose first layer weighs R, G and B by the luminance weights clipper's grayscale conversion
uses (0.299, 0.587, 0.114, summing to 1), with the channel statistics repeated: on an RGB image
open_clip computes what clipper computes on its grayscale version. The last channel is w minus
the first two, so the channels add back to w exactly: reading the folder back is bit-exact (the
clipper config is kept beside open_clip's, under "clipper").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import io
from ..checkpoint import ENCODER_DIR, bundle_text_encoder, read_state_dict, resolve_text_encoder
from ..config import ModelConfig
from ..presets import apply_open_clip_preprocessing, from_open_clip_config
from ..errors import CheckpointError, ConfigError
from .open_clip import from_open_clip_state_dict, to_open_clip_state_dict
from ..model import CLIP

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
LUMA = (0.299, 0.587)  # PIL's "L": 0.299 R + 0.587 G + 0.114 B
_FIRST_CONV = "visual.conv1.weight"  # the first layer of open_clip's ViT and ResNet towers alike


_TEXT_POOL = {"eot": "argmax", "eos": "eos", "last": "last"}  # ours -> open_clip's text pool_type


def _vision_config(v) -> dict:
    if v.timm_model:  # a timm tower, or clipper's ViT standing for one: open_clip builds it with timm
        out = {"image_size": v.image_size, "timm_model_name": v.timm_model, "timm_model_pretrained": False,
               "timm_pool": v.timm_pool, "timm_proj": v.timm_proj or None, "timm_proj_bias": v.timm_proj_bias,
               "timm_drop": v.timm_drop}
        return out | ({"timm_drop_path": v.timm_drop_path} if v.timm_drop_path is not None else {})
    if v.act != "gelu" or v.norm_eps != 1e-5:
        raise ConfigError(f"vision.act {v.act} / norm_eps {v.norm_eps}: open_clip's ViT config has no such setting; "
                          "this model cannot be exported")
    if v.kind == "resnet":
        return {"image_size": v.image_size, "layers": list(v.stages), "width": v.width, "patch_size": None,
                "head_width": v.width * 32 // v.heads}
    vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
              "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
    if not v.ln_pre:
        vision["no_ln_pre"] = True
    if v.norm_after_pool:
        vision["final_ln_after_pool"] = True
    if v.pool == "attn":
        return vision | {"attentional_pool": True, "attn_pooler_queries": v.attn_pool_queries,
                         "attn_pooler_heads": v.attn_pool_heads, "output_tokens": True}
    return vision | {"pool_type": v.pool}


def _text_config(t) -> dict:
    if t.kind == "hf":
        return {"context_length": t.context_length, "hf_model_name": t.hf_model, "hf_tokenizer_name": t.tokenizer,
                "hf_pooler_type": t.hf_pooler or None, "hf_proj_type": t.hf_proj or None, "hf_model_pretrained": False}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    if t.pool == "cls":
        text |= {"embed_cls": True, "output_tokens": True}
    elif t.pool in _TEXT_POOL:
        text |= {"pool_type": _TEXT_POOL[t.pool], "no_causal_mask": t.bidirectional, "eos_id": t.eos_id}
    else:
        raise ConfigError(f"text.pool {t.pool!r}: open_clip has no such text tower; this model cannot be exported")
    text |= {"proj_bias": t.proj_bias, "proj_type": "linear" if t.projection else "none"}
    if t.norm_eps != 1e-5:
        text["norm_kwargs"] = {"eps": t.norm_eps}
    if t.act == "gelu_tanh":
        text["act_kwargs"] = {"approximate": "tanh"}
    if t.tokenizer:
        text["hf_tokenizer_name"] = t.tokenizer
        text["tokenizer_kwargs"] = {"clean": t.tokenizer_clean} | (
            {"strip_sep_token": True} if t.tokenizer_strip_sep else {})
    return text


def to_open_clip_config(config: ModelConfig) -> dict:
    """open_clip's model config (its JSON schema) for `config`; `from_open_clip_config` reads it back."""
    if config.text.act == "quick_gelu" or (config.vision.act == "quick_gelu" and config.vision.kind == "vit"):
        raise ConfigError("a tower's act quick_gelu: open_clip sets QuickGELU for the whole model (quick_gelu)")
    out = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": _vision_config(config.vision),
           "text_cfg": _text_config(config.text), "init_logit_scale": config.init_logit_scale}
    if config.init_logit_bias is not None:  # open_clip makes the parameter only when this is set
        out["init_logit_bias"] = config.init_logit_bias
    if config.custom_text:
        out["custom_text"] = True
    d = config.decoder
    if d is not None and d.kind == "coca":
        out["multimodal_cfg"] = {"context_length": d.context_length, "vocab_size": config.text.vocab_size, "width": d.width,
                                 "heads": d.heads, "layers": d.layers, "mlp_ratio": d.mlp_ratio}
    return out


def _spread(weight: torch.Tensor) -> torch.Tensor:
    """A first-layer weight [out, 1, ...] over R, G, B (see the module docstring)."""
    r, g = weight * LUMA[0], weight * LUMA[1]
    return torch.cat([r, g, weight - (r + g)], dim=1)


# the files of a transformers tokenizer (never config.json: that names a clipper model folder)
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")


def save_open_clip_dir(model: CLIP, path: str | os.PathLike) -> Path:
    """Write `model` as an open_clip local-dir folder (its caption decoder, if clipper's own, is not
    part of open_clip's model and is left out)."""
    config = model.config
    if config.vision.in_channels not in (1, 3):
        raise ConfigError(f"vision.in_channels {config.vision.in_channels}: open_clip's towers take 3 channels")
    sd = {k: v.detach().cpu().contiguous() for k, v in to_open_clip_state_dict(model).items()}
    mean, std = list(config.vision.image_mean), list(config.vision.image_std)
    if config.vision.in_channels == 1:
        sd[_FIRST_CONV] = _spread(sd[_FIRST_CONV]).contiguous()
        mean, std = mean * 3, std * 3
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundled = bundle_text_encoder(config, path)  # a transformers text tower's config and tokenizer, copied in
    if bundled.text.tokenizer == ENCODER_DIR:  # open_clip reads a local-dir model's tokenizer from the folder itself
        for file in sorted((path / ENCODER_DIR).iterdir()):
            if file.name.startswith(_TOKENIZER_FILES):
                with io.atomic_path(path / file.name) as tmp:
                    shutil.copyfile(file, tmp)
    saved = bundled.to_dict()
    saved["decoder"] = None if config.decoder is None or config.decoder.kind != "coca" else saved["decoder"]
    # open_clip reads the text tower's folder relative to its working directory: named absolutely
    model_cfg = to_open_clip_config(resolve_text_encoder(bundled, path))
    meta = {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": config.vision.image_size, "mode": "RGB", "mean": mean, "std": std,
                               "interpolation": config.vision.interpolation,
                               "resize_mode": config.vision.resize},
            "clipper": {"model": saved}}
    with io.atomic_path(path / WEIGHTS) as tmp:
        save_file(sd, str(tmp))
    io.write_json(path / CONFIG, meta)
    return path


def is_open_clip_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_open_clip_dir(path: str | os.PathLike) -> CLIP:
    """A model from an open_clip local-dir folder: clipper's own config where clipper wrote it,
    else open_clip's model and preprocess configs translated."""
    path = Path(path)
    meta = io.read_json_object(path / CONFIG, "open_clip model config", {"model_cfg": dict})
    weights = next((path / n for n in (WEIGHTS, "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")
                    if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no {WEIGHTS} (or open_clip_pytorch_model.bin) beside {CONFIG}")
    sd = read_state_dict(weights)
    saved = meta.get("clipper", {}).get("model") if isinstance(meta.get("clipper"), dict) else None
    if saved is not None:
        config = resolve_text_encoder(ModelConfig.from_dict(saved), path)
    else:
        try:
            config = from_open_clip_config(path.name, meta["model_cfg"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path / CONFIG}: model_cfg is not an open_clip model config ({e})") from None
        apply_open_clip_preprocessing(config.vision, meta.get("preprocess_cfg") or {})
        config.validate()
    if config.vision.in_channels == 1 and _FIRST_CONV in sd:
        w = sd[_FIRST_CONV]
        if w.ndim != 4 or w.shape[1] != 3:
            raise CheckpointError(f"{weights}: {_FIRST_CONV} has {list(w.shape)}; a 1-channel export has 3 channels")
        sd[_FIRST_CONV] = (w[:, :1] + w[:, 1:2]) + w[:, 2:]  # the order _spread makes exact
    return from_open_clip_state_dict(sd, config, source=str(weights), copy=False)
