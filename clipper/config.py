"""Model configs: dataclasses that read and write JSON, and the named presets.

Presets are configs, not code paths: `fmnist-tiny` and `emoji-small` are ours; every ViT CLIP
config that ships with open_clip (ViT-B-32, ViT-B-16, ViT-L-14, ViT-S-32, ViT-M-32, their
-quickgelu twins, ...) is translated from open_clip's own JSON rather than retyped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# open_clip's defaults (OpenAI's dataset statistics), used unless a preset says otherwise.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config that is unknown, malformed or contradictory."""


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    in_channels: int = 3
    pool: str = "tok"  # "tok": class token; "avg": mean of the patch tokens
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD

    def validate(self, where: str = "vision") -> None:
        _positive(self, where, ("image_size", "patch_size", "width", "layers", "heads", "in_channels"))
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"{where}: width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("tok", "avg"):
            raise ConfigError(f"{where}.pool: {self.pool!r} is not one of 'tok', 'avg'")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ConfigError(
                    f"{where}.{name}: {len(getattr(self, name))} values for in_channels={self.in_channels}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"{where}.image_std: values must be positive")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0

    def validate(self, where: str = "text") -> None:
        _positive(self, where, ("context_length", "vocab_size", "width", "layers", "heads"))
        if self.context_length < 2:
            raise ConfigError(f"{where}.context_length: needs room for start and end tokens (>= 2)")
        if self.width % self.heads:
            raise ConfigError(f"{where}: width {self.width} is not divisible by heads {self.heads}")


@dataclass
class ModelConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI-trained weights use x * sigmoid(1.702 x)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for the sigmoid (SigLIP) loss

    def validate(self) -> "ModelConfig":
        _positive(self, "model", ("embed_dim",))
        self.vision.validate()
        self.text.validate()
        return self

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "model").validate()

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


_NESTED = {"vision": VisionConfig, "text": TextConfig}


def _positive(obj: Any, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be positive, got {getattr(obj, name)}")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data`, refusing unknown fields and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        if cls is ModelConfig and name in _NESTED:
            kwargs[name] = _from_dict(_NESTED[name], value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, fields[name].default, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value: Any, default: Any, where: str) -> Any:
    """Coerce JSON values to the type of the field's default (ints where floats go, lists to tuples)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, float) or default is None:
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return value


# --- presets --------------------------------------------------------------------------------

# Fashion-MNIST: 28x28 grayscale, one channel in; 7x7 patches give a 4x4 grid (16 tokens).
# Normalisation statistics of the Fashion-MNIST training images.
_PRESETS: dict[str, dict[str, Any]] = {
    "fmnist-tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 28, "patch_size": 7, "width": 128, "layers": 4, "heads": 4,
                   "in_channels": 1, "image_mean": [0.2860], "image_std": [0.3530]},
        "text": {"context_length": 16, "width": 128, "layers": 3, "heads": 4},
    },
    # Emoji: 64x64 RGB, 8x8 patches (64 tokens); names are short, so a context of 24 holds them.
    "emoji-small": {
        "embed_dim": 256,
        "vision": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 6, "heads": 3,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "text": {"context_length": 24, "width": 192, "layers": 4, "heads": 3},
    },
}

# open_clip config fields that clipper implements, with the values it supports; any other field
# with a non-default value is refused rather than silently ignored.
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
           "custom_text"}
_OC_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "pool_type"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type"}
_OC_DEFAULT_OK = {"patch_dropout": 0.0, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                  "pos_embed_type": "learnable", "final_ln_after_pool": False, "output_tokens": False,
                  "embed_cls": False, "no_causal_mask": False, "proj_bias": False, "proj_type": "linear",
                  "pad_id": 0, "hf_model_name": None, "timm_model_name": None, "act_kwargs": None,
                  "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                  "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                  "custom_text": False, "tokenizer_mode": None, "tokenizer_kwargs": None, "eos_id": 2,
                  "hf_tokenizer_name": None}


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
    if isinstance(vc.get("layers"), (list, tuple)) or not isinstance(vc.get("image_size", 224), int):
        raise ConfigError(f"open_clip config {name}: only square ViT image towers are supported")
    if vc.get("pool_type", "tok") not in ("tok", "avg"):
        raise ConfigError(f"open_clip config {name}: vision_cfg.pool_type={vc['pool_type']!r} is not supported")
    if tc.get("pool_type", "argmax") != "argmax":
        raise ConfigError(f"open_clip config {name}: text_cfg.pool_type={tc['pool_type']!r} is not supported")
    width = vc.get("width", 768)
    cfg = ModelConfig(
        embed_dim=oc["embed_dim"],
        vision=VisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16), width=width,
            layers=vc.get("layers", 12), heads=width // vc.get("head_width", 64),
            mlp_ratio=float(vc.get("mlp_ratio", 4.0)), pool=vc.get("pool_type", "tok")),
        text=TextConfig(
            context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
            width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
            mlp_ratio=float(tc.get("mlp_ratio", 4.0))),
        quick_gelu=bool(oc.get("quick_gelu", False)),
        init_logit_scale=float(oc.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=oc.get("init_logit_bias"),
    )
    return cfg.validate()


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
    return from_open_clip_config(name)
