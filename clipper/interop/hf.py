"""Hugging Face transformers checkpoints: a `CLIPModel` or `SiglipModel` folder (config.json +
model.safetensors, as `save_pretrained` writes it) as a clipper CLIP, and a clipper CLIP written
back as one that `transformers` loads. Both are clipper's own towers (the ViT and the text
transformer), so the weights are renamed (and q/k/v packed), never approximated; transformers
itself is needed for neither direction.

CLIP: OpenAI's layout (class token, pre-norm, end-of-text pooling, projections without bias).
SigLIP: no class token, attention-pooling head, the text's last position through a linear head
with a bias, a logit bias. Preprocessing comes from preprocessor_config.json where there is one.
SigLIP2's folders (Siglip2Model: variable-resolution patches) are refused, naming why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import io
from ..checkpoint import read_state_dict
from ..config import ModelConfig, TextConfig, VisionConfig, mlp_ratio_of
from ..errors import CheckpointError, ConfigError
from ..model import CLIP

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"
KINDS = ("clip", "siglip")
_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers' image processors store them


def model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` of a transformers folder's config.json (None: no such file, or not one)."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return None
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    return kind if isinstance(kind, str) else None


def hf_kind(path: str | os.PathLike) -> str | None:
    """"clip" or "siglip" for a transformers folder of those models, else None (any other folder)."""
    kind = model_type(path)
    if kind == "siglip2":
        raise ConfigError(f"{path}: a Siglip2Model folder (variable-resolution patch embedding) is not supported; "
                          "the open_clip SigLIP2 configs (ViT-*-SigLIP2-*) load with their weights")
    return kind if kind in KINDS else None


# --- transformers -> clipper ----------------------------------------------------------------------

def _tower(c: dict, kind: str, where: str) -> dict:
    try:
        width, hidden = int(c["hidden_size"]), int(c["intermediate_size"])
        act = _ACT[c.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")]
        return {"width": width, "layers": int(c["num_hidden_layers"]), "heads": int(c["num_attention_heads"]),
                "mlp_ratio": mlp_ratio_of(width, hidden),
                "act": act, "norm_eps": float(c.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6))}
    except KeyError as e:
        raise ConfigError(f"{where}: no {e.args[0]} (or hidden_act {c.get('hidden_act')!r} unknown)") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: malformed ({e})") from None


def config_from_hf(hf: dict, folder: Path) -> ModelConfig:
    """The clipper config of a transformers CLIPConfig / SiglipConfig (as a dict)."""
    kind, where = hf.get("model_type"), str(folder / CONFIG)
    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    text = _tower(tc, kind, f"{where}: text_config")
    v = vision_config_from_hf(vc, kind, f"{where}: vision_config")
    vocab, context = int(tc.get("vocab_size", 49408)), int(tc.get("max_position_embeddings", 77))
    if kind == "clip":
        eos = tc.get("eos_token_id", 2)
        pool = {"pool": "eot"} if eos == 2 else {"pool": "eos", "eos_id": int(eos)}  # transformers' legacy rule
        # CLIP BPE is OpenAI's tokenizer; another vocabulary is the folder's own tokenizer
        t = TextConfig(context_length=context, vocab_size=vocab, **text, **pool,
                       tokenizer="" if vocab == 49408 else str(folder))
        dim = int(hf.get("projection_dim", 512))
    else:
        if vc.get("vision_use_head", True) is False:
            raise ConfigError(f"{where}: vision_use_head false (no pooling head): not supported")
        dim = v.width
        if int(tc.get("projection_size", text["width"])) != dim:
            raise ConfigError(f"{where}: text_config.projection_size must equal the vision hidden_size {dim}")
        t = TextConfig(context_length=context, vocab_size=vocab, **text, pool="last", bidirectional=True,
                       proj_bias=True, tokenizer=str(folder), tokenizer_clean="canonicalize")
    quick = t.act == v.act == "quick_gelu"  # open_clip's switch for both towers
    if quick:
        t.act = v.act = "gelu"
    _preprocessing(v, folder)
    return ModelConfig(embed_dim=dim, vision=v, text=t, quick_gelu=quick, custom_text=kind == "siglip",
                       init_logit_bias=0.0 if kind == "siglip" else None).validate()


def vision_config_from_hf(vc: dict, kind: str, where: str) -> VisionConfig:
    """The clipper ViT of a transformers CLIPVisionConfig / SiglipVisionConfig (as a dict): CLIP's
    class token, pre-norm and projection; SigLIP's attention-pooling head."""
    vision = _tower(vc, kind, where)
    if int(vc.get("num_channels", 3)) != 3:
        raise ConfigError(f"{where}: num_channels {vc['num_channels']}: 3 channels only")
    size, patch = int(vc.get("image_size", 224)), int(vc.get("patch_size", 32))
    if kind == "clip":
        return VisionConfig(image_size=size, patch_size=patch, **vision)
    return VisionConfig(image_size=size, patch_size=patch, **vision, pool="map", attn_pool_heads=vision["heads"],
                        class_token=False, patch_bias=True, projection=False, ln_pre=False,
                        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), resize="squash")


def _preprocessing(v: VisionConfig, folder: Path) -> None:
    path = folder / PREPROCESSOR
    if not path.is_file():
        return
    p = io.read_json_object(path, "image processor config", {})
    if p.get("image_mean") and p.get("image_std"):
        v.image_mean, v.image_std = tuple(map(float, p["image_mean"])), tuple(map(float, p["image_std"]))
    v.interpolation = _RESAMPLE.get(p.get("resample"), v.interpolation)
    if "do_center_crop" in p:
        v.resize = "shortest" if p["do_center_crop"] else "squash"


_LAYER = {"self_attn.out_proj.": "attn.out.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.fc.",
          "mlp.fc2.": "mlp.proj."}
_HF_RULES = {  # (transformers name, clipper name) outside the layers
    "clip": {"text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
             "vision_model.embeddings.class_embedding": "visual.class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.weight",
             "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding"},
    "siglip": {"text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
               "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.weight",
               "vision_model.embeddings.patch_embedding.bias": "visual.patch_embed.bias",
               "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
               "vision_model.head.probe": "visual.map_pool.latent"},
}
_HF_PREFIXES = {  # LayerNorms and linear layers kept whole: (transformers prefix, clipper prefix)
    "clip": {"text_model.final_layer_norm.": "text.ln_final.", "vision_model.pre_layrnorm.": "visual.ln_pre.",
             "vision_model.post_layernorm.": "visual.ln_post."},
    "siglip": {"text_model.final_layer_norm.": "text.ln_final.", "text_model.head.": "text.proj.",
               "vision_model.post_layernorm.": "visual.ln_post.",
               "vision_model.head.attention.out_proj.": "visual.map_pool.proj.",
               "vision_model.head.layernorm.": "visual.map_pool.norm.",
               "vision_model.head.mlp.fc1.": "visual.map_pool.mlp.fc.",
               "vision_model.head.mlp.fc2.": "visual.map_pool.mlp.proj."},
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.proj"}  # CLIP: [out, in]


def from_hf_state_dict(sd: dict[str, torch.Tensor], kind: str, source: str) -> dict[str, torch.Tensor]:
    """transformers' tensors -> clipper's names (q, k and v packed into one projection)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # old files keep the index buffers
    out, qkv = {}, {}
    for key, value in sd.items():
        m = re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            tower, block = ("text" if m[1] == "text" else "visual"), f"{m[1]}.{m[2]}"
            rest = m[3]
            proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if proj:
                qkv.setdefault((tower, m[2], proj[2]), {})[proj[1]] = value
                continue
            for theirs, ours in _LAYER.items():
                if rest.startswith(theirs):
                    out[f"{tower}.transformer.blocks.{m[2]}.{ours}{rest[len(theirs):]}"] = value
                    break
            else:
                raise CheckpointError(f"{source}: tensor {key} has no place in clipper's {kind} towers")
        elif key in _HF_RULES[kind]:
            out[_HF_RULES[kind][key]] = value
        elif kind == "clip" and key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key.startswith("vision_model.head.attention.in_proj_"):
            w = value.shape[0] // 3
            part = key.rsplit("_", 1)[1]  # weight or bias
            out[f"visual.map_pool.q.{part}"], out[f"visual.map_pool.kv.{part}"] = value[:w], value[w:]
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        else:
            prefix = next((p for p in _HF_PREFIXES[kind] if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"{source}: tensor {key} has no place in clipper's {kind} towers")
            out[_HF_PREFIXES[kind][prefix] + key[len(prefix):]] = value
    for (tower, block, part), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: layer {block} of the {tower} tower lacks q, k or v {part}")
        out[f"{tower}.transformer.blocks.{block}.attn.qkv.{part}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def load_hf_dir(path: str | os.PathLike) -> CLIP:
    """A clipper CLIP from a transformers CLIPModel / SiglipModel folder."""
    path = Path(path)
    kind = hf_kind(path)
    hf = io.read_json_object(path / CONFIG, "transformers model config", {})
    config = config_from_hf(hf, path)
    weights = path / WEIGHTS
    if not weights.is_file():
        found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: no {WEIGHTS} (sharded checkpoints are not supported)")
        weights = found[0]
    sd = from_hf_state_dict(read_state_dict(weights), kind, str(weights))
    if "logit_bias" in sd:
        config.init_logit_bias = float(sd["logit_bias"])
    return CLIP.from_state_dict(config, sd, str(weights))


# --- clipper -> transformers ----------------------------------------------------------------------

def _vision_kind(v) -> str | None:
    """clip or siglip: the transformers vision model whose shape clipper's ViT `v` has, else None."""
    if not (v.kind == "vit" and v.in_channels == 3 and v.ln_pre == (v.pool == "tok") and not v.norm_after_pool):
        return None
    if v.pool == "tok" and v.class_token and v.projection and not v.patch_bias:
        return "clip"
    if v.pool == "map" and not v.class_token and not v.projection and v.patch_bias and v.attn_pool_heads == v.heads:
        return "siglip"
    return None


def hf_vision_kind(config: ModelConfig) -> str:
    """Which transformers vision model holds `config`'s image tower (clip or siglip), or a
    ConfigError naming what does not fit."""
    kind = _vision_kind(config.vision)
    if kind is None:
        raise ConfigError("this model's image tower is neither a CLIPVisionModel (ViT with class token, pre-norm "
                          "and projection) nor a SiglipVisionModel (ViT with attention pooling): transformers has "
                          "no class for it")
    return kind


def hf_kind_of(config: ModelConfig) -> str:
    """Which transformers model holds `config` (clip or siglip), or a ConfigError naming what does not fit."""
    v, t = config.vision, config.text
    kind = _vision_kind(v)
    text = t.kind == "clipper" and t.projection and (config.decoder is None or config.decoder.kind != "coca")
    if text and kind == "clip" and t.causal and t.pool in ("eot", "eos") and not t.proj_bias \
            and v.norm_eps == t.norm_eps:
        return "clip"
    if text and kind == "siglip" and t.pool == "last" and t.bidirectional and t.proj_bias:
        return "siglip"
    raise ConfigError("this model is neither a CLIPModel (ViT with class token and projection, causal text "
                      "pooled at its end token) nor a SiglipModel (ViT with attention pooling, bidirectional text "
                      "pooled at its last position): transformers has no class for it")


def _hf_tower(cfg, width: int, quick: bool) -> dict:
    return {"hidden_size": width, "intermediate_size": int(width * cfg.mlp_ratio), "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "hidden_act": "quick_gelu" if quick else _HF_ACT[cfg.act],
            "layer_norm_eps": cfg.norm_eps, "attention_dropout": 0.0}


def hf_vision_config(model: CLIP, kind: str) -> dict:
    """transformers' vision_config (a dict) of the model's image tower, as a `kind` (clip, siglip) model."""
    v = model.config.vision
    return _hf_tower(v, v.width, model.config.quick_gelu) | {"image_size": v.image_size, "patch_size": v.patch_size,
                                                             "num_channels": 3, "model_type": f"{kind}_vision_model"}


def hf_config(model: CLIP) -> dict:
    c, kind = model.config, hf_kind_of(model.config)
    t = c.text
    text = _hf_tower(t, t.width, c.quick_gelu) | {"vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
                                                  "model_type": f"{kind}_text_model"}
    vision = hf_vision_config(model, kind)
    if kind == "clip":
        text |= {"eos_token_id": 2 if t.pool == "eot" else t.eos_id, "bos_token_id": 49406, "pad_token_id": 1}
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
                "logit_scale_init_value": float(model.logit_scale.detach()), "text_config": text,
                "vision_config": vision}
    text["projection_size"] = c.embed_dim
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text,
            "vision_config": vision | {"vision_use_head": True}}


def to_hf_state_dict(model: CLIP, vision_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' CLIPModel / SiglipModel names; `vision_only`: the
    image tower's alone (vision_model.*), for a tower that transformers' vision model holds."""
    kind = hf_vision_kind(model.config) if vision_only else hf_kind_of(model.config)
    ours = {k: v for k, v in model.state_dict().items()
            if k.startswith("visual.") or not (vision_only or k.startswith("decoder."))}
    back = {o: h for h, o in _HF_RULES[kind].items()}
    prefixes = {o: h for h, o in _HF_PREFIXES[kind].items()}
    layer = {o: h for h, o in _LAYER.items()}
    out = {}
    for key, value in ours.items():
        m = re.match(r"(text|visual)\.transformer\.blocks\.(\d+)\.(.+)$", key)
        if m:
            tower = f"{'text' if m[1] == 'text' else 'vision'}_model.encoder.layers.{m[2]}."
            if m[3].startswith("attn.qkv."):
                part = m[3].rsplit(".", 1)[1]
                for name, chunk in zip("qkv", value.chunk(3)):
                    out[f"{tower}self_attn.{name}_proj.{part}"] = chunk
            else:
                ours_prefix = next(p for p in layer if m[3].startswith(p))
                out[tower + layer[ours_prefix] + m[3][len(ours_prefix):]] = value
        elif key in back:
            out[back[key]] = value
        elif key in ("visual.proj", "text.proj") and kind == "clip":
            out[{v: k for k, v in _TRANSPOSED.items()}[key]] = value.t()
        elif key.startswith(("visual.map_pool.q.", "visual.map_pool.kv.")):
            continue  # packed below
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1) if kind == "siglip" else value.reshape(())
        else:
            prefix = next(p for p in prefixes if key.startswith(p))
            out[prefixes[prefix] + key[len(prefix):]] = value
    if kind == "siglip":
        for part in ("weight", "bias"):
            out[f"vision_model.head.attention.in_proj_{part}"] = torch.cat(
                [ours[f"visual.map_pool.q.{part}"], ours[f"visual.map_pool.kv.{part}"]])
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_image_processor(model: CLIP, kind: str) -> dict:
    """preprocessor_config.json of a transformers image processor that prepares images as the
    model's own preprocessing does (resize, centre crop or squash, normalisation)."""
    v = model.config.vision
    size = {"shortest_edge": v.image_size} if v.resize == "shortest" else {"height": v.image_size,
                                                                           "width": v.image_size}
    return {"image_processor_type": "CLIPImageProcessor" if kind == "clip" else "SiglipImageProcessor",
            "do_resize": True, "size": size, "resample": {n: c for c, n in _RESAMPLE.items()}[v.interpolation],
            "do_center_crop": v.resize == "shortest", "crop_size": {"height": v.image_size, "width": v.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(v.image_mean), "image_std": list(v.image_std)}


def save_hf_dir(model: CLIP, path: str | os.PathLike) -> Path:
    """Write `model` as a transformers folder (config.json, model.safetensors, preprocessor_config.json)."""
    config, sd = hf_config(model), to_hf_state_dict(model)
    processor = hf_image_processor(model, config["model_type"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path / WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    io.write_json(path / PREPROCESSOR, processor)
    io.write_json(path / CONFIG, config)
    return path

