"""open_clip <-> clipper weights for open_clip's ViT + text-transformer models: `CLIP`,
`CustomTextCLIP` and `CoCa`.

Both use the same tensors under different names (open_clip's packed `in_proj` is our `qkv`),
so conversion is a renaming, exact in both directions; only CoCa's attentional pooler packs its
projections differently (open_clip: q, k, v, or one in_proj; clipper: q and kv).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import read_state_dict
from ..config import DecoderConfig, ModelConfig, TextConfig, VisionConfig
from ..errors import CheckpointError
from ..io import atomic_path
from ..model import CLIP
from ..errors import ConfigError

# (clipper pattern, open_clip pattern); block indices carry over as \1. Text rules come in two
# layouts: open_clip's CLIP keeps the text tower at the top level, CoCa and CustomTextCLIP under "text.".
_RULES = [
    (r"visual\.patch_embed\.weight", r"visual.conv1.weight"),
    (r"visual\.transformer\.blocks\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"visual\.attn_pool\.out\.", r"visual.attn_pool.attn.out_proj."),
    (r"decoder\.blocks\.(\d+)\.", r"text_decoder.resblocks.\1."),
    (r"decoder\.cross\.(\d+)\.", r"text_decoder.cross_attn.\1."),
    (r"decoder\.proj$", r"text_decoder.text_projection"),
    (r"decoder\.", r"text_decoder."),
]
_TEXT_RULES = {
    False: [(r"text\.transformer\.blocks\.(\d+)\.", r"transformer.resblocks.\1."), (r"text\.proj$", r"text_projection"),
            (r"text\.proj\.", r"text_projection."), (r"text\.", r"")],
    True: [(r"text\.transformer\.blocks\.(\d+)\.", r"text.transformer.resblocks.\1."),
           (r"text\.proj$", r"text.text_projection"), (r"text\.proj\.", r"text.text_projection.")],
}
_BLOCK_RULES = [
    (r"attn\.qkv\.", r"attn.in_proj_"),
    (r"attn\.out\.", r"attn.out_proj."),
    (r"mlp\.fc\.", r"mlp.c_fc."),
    (r"mlp\.proj\.", r"mlp.c_proj."),
]
# Entries of OpenAI/open_clip files that are not weights.
_NON_WEIGHTS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_POOL = "visual.attn_pool."
_TIMM = ("visual.trunk.", "visual.head.")  # a timm tower: named as in open_clip already
# clipper's ViT in place of a timm network (SigLIP's): open_clip's names are timm's, under visual.trunk.
_B = r"visual\.transformer\.blocks\.(\d+)\."
_TIMM_VIT_RULES = [
    (r"visual\.patch_embed\.", r"visual.trunk.patch_embed.proj."),
    (r"visual\.positional_embedding$", r"visual.trunk.pos_embed"),  # [N, D] here, [1, N, D] in timm
    (_B + r"ln_1\.", r"visual.trunk.blocks.\1.norm1."), (_B + r"ln_2\.", r"visual.trunk.blocks.\1.norm2."),
    (_B + r"attn\.out\.", r"visual.trunk.blocks.\1.attn.proj."), (_B + r"mlp\.fc\.", r"visual.trunk.blocks.\1.mlp.fc1."),
    (_B + r"mlp\.proj\.", r"visual.trunk.blocks.\1.mlp.fc2."), (_B, r"visual.trunk.blocks.\1."),
    (r"visual\.ln_post\.", r"visual.trunk.norm."),
    (r"visual\.map_pool\.mlp\.fc\.", r"visual.trunk.attn_pool.mlp.fc1."),
    (r"visual\.map_pool\.mlp\.proj\.", r"visual.trunk.attn_pool.mlp.fc2."),
    (r"visual\.map_pool\.", r"visual.trunk.attn_pool."),
]
_TIMM_POS = "visual.trunk.pos_embed"


def open_clip_name(key: str, custom_text: bool = False, timm_vit: bool = False, hf_text: bool = False) -> str:
    """open_clip's name for the clipper parameter `key` (the attentional pooler's q and kv layers are
    packed differently: see `_pooler_to_open_clip`); `timm_vit`: the ViT stands for a timm network;
    `hf_text`: the text tower is a transformers model (named as in open_clip already)."""
    if key.startswith(_TIMM) or (hf_text and key.startswith("text.")):
        return key
    if timm_vit and key.startswith("visual."):
        for pattern, repl in _TIMM_VIT_RULES:
            key, n = re.subn("^" + pattern, repl, key)
            if n:
                return key
    in_block = ".blocks." in key or ".cross." in key
    for pattern, repl in _TEXT_RULES[custom_text] + _RULES:
        key, n = re.subn("^" + pattern, repl, key)
        if n:
            break
    if in_block:
        for pattern, repl in _BLOCK_RULES:
            key = re.sub(pattern, repl, key)
    return key


def _pooler_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pooler's q and packed kv layers -> open_clip's nn.MultiheadAttention tensors (one packed
    in_proj_weight when keys and queries have one width, separate q/k/v weights otherwise)."""
    if _POOL + "q.weight" not in sd:
        return sd
    sd = dict(sd)
    q, kv = sd.pop(_POOL + "q.weight"), sd.pop(_POOL + "kv.weight")
    bias = torch.cat([sd.pop(_POOL + "q.bias"), sd.pop(_POOL + "kv.bias")])
    k, v = kv.chunk(2)
    if q.shape == k.shape:
        sd[_POOL + "attn.in_proj_weight"] = torch.cat([q, k, v])
    else:
        sd |= {_POOL + "attn.q_proj_weight": q, _POOL + "attn.k_proj_weight": k, _POOL + "attn.v_proj_weight": v}
    sd[_POOL + "attn.in_proj_bias"] = bias
    return sd


def _pooler_from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attn = _POOL + "attn."
    if attn + "in_proj_bias" not in sd:
        return sd
    sd = dict(sd)
    if attn + "in_proj_weight" in sd:
        q, k, v = sd.pop(attn + "in_proj_weight").chunk(3)
    else:
        q, k, v = (sd.pop(attn + f"{n}_proj_weight") for n in "qkv")
    bias = sd.pop(attn + "in_proj_bias")
    dim = q.shape[0]
    sd |= {_POOL + "q.weight": q, _POOL + "q.bias": bias[:dim], _POOL + "kv.weight": torch.cat([k, v]),
           _POOL + "kv.bias": bias[dim:]}
    return sd


def _names(config: ModelConfig) -> dict:
    return {"custom_text": config.custom_text, "timm_vit": config.vision.kind == "vit" and bool(config.vision.timm_model),
            "hf_text": config.text.kind == "hf"}


def _key_map(model: CLIP) -> dict[str, str]:
    """{open_clip name (pooler unpacked): clipper name} for every tensor of `model`."""
    naming = _names(model.config)
    return {open_clip_name(k, **naming): k for k in model.state_dict()}


def _exported(model: CLIP) -> bool:
    """Whether the decoder is part of open_clip's model (CoCa's), not one of clipper's own."""
    return model.decoder is not None and model.config.decoder.kind == "coca"


def to_open_clip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The state dict that open_clip's model of the same config (CLIP, CustomTextCLIP or CoCa)
    loads with strict=True (clipper's own caption decoder has no open_clip counterpart and is left out)."""
    if model.config.text.pool == "mean":
        raise ConfigError(f"text.pool {model.config.text.pool!r}: open_clip's CLIP pools the end-of-text "
                         "token of a causal text tower; this model cannot be exported to it")
    keep_decoder = _exported(model)
    sd = {k: v for k, v in model.state_dict().items() if keep_decoder or not k.startswith("decoder.")}
    naming = _names(model.config)
    out = {open_clip_name(k, **naming): v for k, v in _pooler_to_open_clip(sd).items()}
    if _TIMM_POS in out and naming["timm_vit"]:
        out[_TIMM_POS] = out[_TIMM_POS].unsqueeze(0)
    return out


def config_from_open_clip_state_dict(sd: dict[str, torch.Tensor], quick_gelu: bool = False,
                                     head_width: int = 64) -> ModelConfig:
    """Infer the architecture from tensor shapes (heads assume open_clip's 64-wide heads; an
    attentional pooler's heads, which no shape tells, open_clip's default of 8)."""
    try:
        if "visual.attnpool.positional_embedding" in sd:
            vision = _resnet_config(sd, head_width)
        else:
            vision = _vit_config(sd, head_width)
        t = "text." if "text.token_embedding.weight" in sd else ""  # CoCa / CustomTextCLIP keep it under text.
        t_width = sd[t + "ln_final.weight"].shape[0]

        def mlp_ratio(prefix: str, w: int) -> float:
            return sd[prefix + "0.mlp.c_fc.weight"].shape[0] / w

        cls = t + "cls_emb" in sd
        decoder = None
        if "text_decoder.ln_final.weight" in sd:
            d_width = sd["text_decoder.ln_final.weight"].shape[0]
            decoder = DecoderConfig(kind="coca", width=d_width, layers=_blocks(sd, "text_decoder.resblocks."),
                                    heads=max(1, d_width // head_width),
                                    mlp_ratio=mlp_ratio("text_decoder.resblocks.", d_width),
                                    context_length=sd[t + "positional_embedding"].shape[0] - cls)
        return ModelConfig(
            embed_dim=sd[t + "text_projection"].shape[1],
            vision=vision,
            text=TextConfig(context_length=sd[t + "positional_embedding"].shape[0] - cls,
                            vocab_size=sd[t + "token_embedding.weight"].shape[0], width=t_width,
                            layers=_blocks(sd, t + "transformer.resblocks."), heads=max(1, t_width // head_width),
                            mlp_ratio=mlp_ratio(t + "transformer.resblocks.", t_width),
                            pool="cls" if cls else "eot"),
            quick_gelu=quick_gelu,
            init_logit_bias=float(sd["logit_bias"]) if "logit_bias" in sd else None,
            decoder=decoder, custom_text=bool(t),
        ).validate()
    except KeyError as e:
        raise CheckpointError(f"not an open_clip CLIP state dict: no {e.args[0]!r}") from None


def _blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _vit_config(sd: dict[str, torch.Tensor], head_width: int) -> VisionConfig:
    conv = sd["visual.conv1.weight"]
    width, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    pool = "visual.attn_pool.query" in sd
    return VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                        layers=_blocks(sd, "visual.transformer.resblocks."), heads=max(1, width // head_width),
                        in_channels=in_channels,
                        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                        pool="attn" if pool else "tok",
                        attn_pool_queries=sd["visual.attn_pool.query"].shape[0] if pool else 256,
                        **_channel_stats(in_channels))


def _resnet_config(sd: dict[str, torch.Tensor], head_width: int) -> VisionConfig:
    width, in_channels = sd["visual.bn3.weight"].shape[0], sd["visual.conv1.weight"].shape[1]
    spatial = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
    stages = tuple(_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
    return VisionConfig(kind="resnet", stages=stages, layers=4, image_size=spatial * 32, width=width,
                        heads=max(1, width * 32 // head_width), in_channels=in_channels, **_channel_stats(in_channels))


def _channel_stats(in_channels: int) -> dict:
    return {} if in_channels == 3 else {"image_mean": (0.5,) * in_channels, "image_std": (0.5,) * in_channels}


def from_open_clip_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig | None = None,
                              source: str = "open_clip state dict", copy: bool = True) -> CLIP:
    """A clipper CLIP holding the weights of an open_clip CLIP state dict (copied, so that the two
    models do not share storage; `copy=False` adopts tensors that nothing else holds)."""
    sd = _pooler_from_open_clip({k: v for k, v in sd.items() if k not in _NON_WEIGHTS})
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
    # open_clip stores logit_scale as a scalar or as shape [1]; clipper uses a scalar (and timm's
    # positions [1, N, D] are clipper's [N, D]).
    timm_vit = _names(config)["timm_vit"]
    tensors = {names[k]: (v.reshape(()) if k.startswith("logit_") else v[0] if k == _TIMM_POS and v.ndim == 3
                          and timm_vit else v) for k, v in sd.items()}
    return CLIP.from_state_dict(config, {k: v.clone() for k, v in tensors.items()} if copy else tensors, source)


def is_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """open_clip's names (not clipper's): its text projection or blocks, or a ViT's/ResNet's conv1."""
    return "visual.conv1.weight" in sd or any(k.endswith("text_projection") or "text_projection." in k
                                              or ".resblocks." in k for k in sd)


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
