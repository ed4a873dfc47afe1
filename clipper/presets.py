"""Named model configs: clipper's own presets, and every open_clip config clipper builds,
translated from open_clip's shipped JSON rather than retyped (ViT-B-32, ViT-L-14, SigLIP, CoCa,
ConvNeXt through timm, ...), with the preprocessing of their pretrained tags. Presets are configs,
not code paths. A config is offered only if its decoder kind accepts it (clipper.model.decoders).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .config import DecoderConfig, ModelConfig, TextConfig, VisionConfig
from .errors import ConfigError
from .model.decoders import check_decoder


# Fashion-MNIST: 28x28 grayscale, one channel in; 7x7 patches give a 4x4 grid (16 tokens).
# Normalisation statistics of the Fashion-MNIST training images.
_PRESETS: dict[str, dict[str, Any]] = {
    "fmnist-tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 28, "patch_size": 7, "width": 128, "layers": 4, "heads": 4,
                   "in_channels": 1, "image_mean": [0.2860], "image_std": [0.3530]},
        "text": {"context_length": 16, "width": 128, "layers": 3, "heads": 4},
    },
    # Emoji: the 64x64 renders seen at 48 px through 8x8 patches (36 tokens). At 32 px (16 tokens)
    # retrieval saturated after ~7 of the 10 minutes; 48 px scored better on a held-out shard
    # (benchmarks/README.md, E6-E7). A context of 32 holds every name and keyword list.
    "emoji-small": {
        "embed_dim": 128,
        "vision": {"image_size": 48, "patch_size": 8, "width": 128, "layers": 4, "heads": 2,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "text": {"context_length": 32, "width": 128, "layers": 3, "heads": 2},
    },
}

# open_clip config fields that clipper implements, with the values it supports; any other field
# with a non-default value is refused rather than silently ignored.
# (output_tokens only says what open_clip's forward returns.)
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
           "custom_text", "multimodal_cfg"}
_OC_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "pool_type",
              "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "output_tokens", "no_ln_pre",
              "final_ln_after_pool", "timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
              "timm_drop_path"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type", "embed_cls",
            "output_tokens", "no_causal_mask", "proj_bias", "eos_id", "norm_kwargs", "act_kwargs",
            "hf_tokenizer_name", "tokenizer_kwargs", "proj_type", "hf_model_name", "hf_pooler_type", "hf_proj_type",
            "hf_model_pretrained"}
# CoCa's decoder; open_clip's MultimodalTransformer does not read dim_head, n_queries, attn_pooler_heads
_OC_MULTIMODAL = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "dim_head", "n_queries",
                  "attn_pooler_heads"}
_OC_DEFAULT_OK = {"patch_dropout": 0.0, "ls_init_value": None, "timm_model_pretrained": False,
                  "pos_embed_type": "learnable", "correct_cls_mask": False,
                  "pad_id": 0, "block_type": None, "qk_norm": False,
                  "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                  "scale_fc": False, "custom_text": False, "tokenizer_mode": None}
_OC_TEXT_POOL = {"argmax": "eot", "eos": "eos", "last": "last"}  # open_clip's text pool_type -> ours


def _text_from_open_clip(name: str, tc: dict[str, Any]) -> TextConfig:
    if tc.get("hf_model_name"):  # open_clip's HF adapter (hf_model_pretrained: the weights come from the checkpoint)
        return TextConfig(kind="hf", context_length=tc.get("context_length", 77), hf_model=tc["hf_model_name"],
                          hf_pooler=tc.get("hf_pooler_type") or "", hf_proj=tc.get("hf_proj_type") or "",
                          tokenizer=tc.get("hf_tokenizer_name") or tc["hf_model_name"])
    pool = tc.get("pool_type", "argmax")
    if pool not in _OC_TEXT_POOL:
        raise ConfigError(f"open_clip config {name}: text_cfg.pool_type={pool!r} is not supported")
    if tc.get("proj_type", "linear") not in ("linear", "none"):
        raise ConfigError(f"open_clip config {name}: text_cfg.proj_type={tc['proj_type']!r} is not supported")
    norm, act = dict(tc.get("norm_kwargs") or {}), dict(tc.get("act_kwargs") or {})
    tok = dict(tc.get("tokenizer_kwargs") or {})
    for what, extra in (("norm_kwargs", set(norm) - {"eps"}), ("act_kwargs", set(act) - {"approximate"}),
                        ("tokenizer_kwargs", set(tok) - {"clean", "strip_sep_token"})):
        if extra:
            raise ConfigError(f"open_clip config {name}: text_cfg.{what} {sorted(extra)} is not supported by clipper")
    if act.get("approximate", "none") not in ("none", "tanh"):
        raise ConfigError(f"open_clip config {name}: text_cfg.act_kwargs.approximate={act['approximate']!r}")
    return TextConfig(
        context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
        width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
        mlp_ratio=float(tc.get("mlp_ratio", 4.0)), pool="cls" if tc.get("embed_cls") else _OC_TEXT_POOL[pool],
        bidirectional=bool(tc.get("no_causal_mask", False)) and not tc.get("embed_cls"),
        eos_id=tc.get("eos_id", 2), proj_bias=bool(tc.get("proj_bias", False)),
        projection=tc.get("proj_type", "linear") != "none",
        act="gelu_tanh" if act.get("approximate") == "tanh" else "gelu", norm_eps=float(norm.get("eps", 1e-5)),
        tokenizer=tc.get("hf_tokenizer_name") or "", tokenizer_clean=tok.get("clean", "whitespace"),
        tokenizer_strip_sep=bool(tok.get("strip_sep_token", False)))


def _vision_from_open_clip(name: str, vc: dict[str, Any]) -> VisionConfig:
    if not isinstance(vc.get("image_size", 224), int):
        raise ConfigError(f"open_clip config {name}: only square image towers are supported")
    if vc.get("timm_model_name"):
        timm = VisionConfig(kind="timm", image_size=vc.get("image_size", 224), timm_model=vc["timm_model_name"],
                            timm_pool=vc.get("timm_pool", "avg"), timm_proj=vc.get("timm_proj", "linear") or "",
                            timm_proj_bias=bool(vc.get("timm_proj_bias", False)),
                            timm_drop=float(vc.get("timm_drop", 0.0)), timm_drop_path=vc.get("timm_drop_path"))
        from .model.timm_tower import as_own_vit  # reads timm's network: imported only here

        return as_own_vit(timm) or timm
    resnet = isinstance(vc.get("layers"), (list, tuple))
    if vc.get("pool_type", "tok") not in ("tok", "avg"):
        raise ConfigError(f"open_clip config {name}: vision_cfg.pool_type={vc['pool_type']!r} is not supported")
    if vc.get("attentional_pool", False) not in (False, True):  # "parallel"/"cascade": open_clip's untested WIP
        raise ConfigError(f"open_clip config {name}: vision_cfg.attentional_pool={vc['attentional_pool']!r} "
                          "is not supported")
    width = vc.get("width", 768)
    return VisionConfig(
        kind="resnet" if resnet else "vit", stages=tuple(vc["layers"]) if resnet else (),
        image_size=vc.get("image_size", 224), patch_size=32 if resnet else vc.get("patch_size", 16), width=width,
        layers=len(vc["layers"]) if resnet else vc.get("layers", 12),
        heads=width * (32 if resnet else 1) // vc.get("head_width", 64),
        mlp_ratio=float(vc.get("mlp_ratio", 4.0)),
        pool="attn" if vc.get("attentional_pool") else vc.get("pool_type", "tok"),
        attn_pool_queries=vc.get("attn_pooler_queries", 256), attn_pool_heads=vc.get("attn_pooler_heads", 8),
        ln_pre=not vc.get("no_ln_pre", False), norm_after_pool=bool(vc.get("final_ln_after_pool", False)))


def from_open_clip_config(name: str, oc: dict[str, Any] | None = None) -> ModelConfig:
    """Translate open_clip's model config `name` (its shipped JSON) into a ModelConfig."""
    if oc is None:
        import open_clip

        oc = open_clip.get_model_config(name)
        if oc is None:
            raise ConfigError(f"{name!r} is neither a clipper preset nor an open_clip model config")
    _refuse_unsupported(name, oc, _OC_TOP, "")
    vc, tc = dict(oc["vision_cfg"]), dict(oc["text_cfg"])
    _refuse_unsupported(name, vc, _OC_VISION, "vision_cfg.")
    _refuse_unsupported(name, tc, _OC_TEXT, "text_cfg.")
    decoder = None
    if "multimodal_cfg" in oc:
        mc = dict(oc["multimodal_cfg"])
        _refuse_unsupported(name, mc, _OC_MULTIMODAL, "multimodal_cfg.")
        if mc.get("vocab_size", 49408) != tc.get("vocab_size", 49408):
            raise ConfigError(f"open_clip config {name}: multimodal_cfg.vocab_size differs from the text tower's")
        decoder = DecoderConfig(kind="coca", width=mc.get("width", 512), layers=mc.get("layers", 12),
                                heads=mc.get("heads", 8), mlp_ratio=float(mc.get("mlp_ratio", 4)),
                                context_length=mc.get("context_length", 77))
    cfg = ModelConfig(
        embed_dim=oc["embed_dim"],
        vision=_vision_from_open_clip(name, vc),
        text=_text_from_open_clip(name, tc),
        quick_gelu=bool(oc.get("quick_gelu", False)),
        init_logit_scale=float(oc.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=oc.get("init_logit_bias"),
        decoder=decoder,
        custom_text=bool(oc.get("custom_text", False)) or decoder is not None or "hf_model_name" in tc,
    )
    check_decoder(cfg.validate())
    return cfg


def _refuse_unsupported(name: str, section: dict[str, Any], supported: set[str], prefix: str) -> None:
    for key, value in section.items():
        if key in supported:
            continue
        if key in _OC_DEFAULT_OK and value == _OC_DEFAULT_OK[key]:
            continue
        raise ConfigError(f"open_clip config {name}: {prefix}{key}={value!r} is not supported by clipper")


def list_presets() -> list[str]:
    """clipper's own presets, then every open_clip config clipper can build."""
    import open_clip

    names = list(_PRESETS)
    for name in open_clip.list_models():
        try:
            from_open_clip_config(name)
        except (ConfigError, KeyError, TypeError):
            continue
        names.append(name)
    return names


def preset(name: str) -> ModelConfig:
    """The named config: a clipper preset or an open_clip model name (e.g. 'ViT-B-32')."""
    if name in _PRESETS:
        return ModelConfig.from_dict(_PRESETS[name])
    config = from_open_clip_config(name)
    settings = _tag_preprocessing(name)
    if settings is not None:  # every pretrained tag of the architecture preprocesses alike: that way
        apply_open_clip_preprocessing(config.vision, settings)
    return config


def _tag_preprocessing(name: str) -> dict[str, Any] | None:
    import open_clip

    found = {json.dumps({k: open_clip.get_pretrained_cfg(name, tag).get(k) for k in _PREPROCESS}, sort_keys=True)
             for tag in open_clip.list_pretrained_tags_by_model(name)}
    return json.loads(found.pop()) if len(found) == 1 else None


_PREPROCESS = ("mean", "std", "interpolation", "resize_mode")


def apply_open_clip_preprocessing(vision: VisionConfig, tag_cfg: dict[str, Any]) -> None:
    """Take mean/std, interpolation and resize mode from an open_clip pretrained config, where it says."""
    if tag_cfg.get("mean") and tag_cfg.get("std"):
        vision.image_mean = tuple(float(v) for v in tag_cfg["mean"])
        vision.image_std = tuple(float(v) for v in tag_cfg["std"])
    if tag_cfg.get("interpolation") in ("bicubic", "bilinear"):
        vision.interpolation = tag_cfg["interpolation"]
    if tag_cfg.get("resize_mode") in ("shortest", "squash"):
        vision.resize = tag_cfg["resize_mode"]
