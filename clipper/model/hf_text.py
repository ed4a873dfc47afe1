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

from ..config import TextConfig
from ..errors import ConfigError
from ..hub import from_hub
from .meta import build

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

    def init_weights(self) -> None:
        """transformers initialises its model when it builds it; the projection keeps PyTorch's init (as open_clip)."""

    def init_blocks(self) -> None:
        """Nothing: see init_weights."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (the tokenizer's ids, padding = the model's pad id) -> [B, embed_dim]."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, length], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        mask = (tokens != self.pad_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        h = out.last_hidden_state
        if self.pooler == "mean_pooler":
            pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
        elif self.pooler == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        else:  # cls_pooler without a pooler output, cls_last_hidden_state_pooler
            pooled = h[:, 0]
        return self.proj(pooled)
