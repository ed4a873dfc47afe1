"""A timm model as the image tower, as open_clip builds it (its timm adapter): the trunk is timm's
own module, so ConvNeXt, EVA, FastViT/MCi (MobileCLIP), PE-Core, ViTamin and timm's SigLIP ViTs
are timm's code and stay in step with timm; then open_clip's head: the trunk's global pool (or an
attention pool), and a linear or MLP projection, or timm's own classifier as the projection.
Parameter names are open_clip's (trunk.*, head.*), so weights map one to one.

A timm model that is a plain SigLIP ViT runs in clipper's own ViT instead (`as_own_vit`).

Inference runs a reparameterised copy where timm can fuse the trunk's training-time branches
(FastViT/MCi's MobileOne blocks, for MobileCLIP): the same function, 1.3-1.4x faster here; the
weights themselves stay unfused (they are what open_clip loads and what training updates).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import OrderedDict

import torch
from torch import nn

from ..config import VisionConfig, mlp_ratio_of
from ..errors import ConfigError
from .meta import SkipMetaInit, build
from .tower import check_images


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("this model's image tower is a timm model: pip install timm") from None
    return timm


def _create(cfg: VisionConfig, **kwargs) -> nn.Module:
    timm = _timm()
    if not timm.is_model(cfg.timm_model):
        raise ConfigError(f"vision.timm_model: timm {timm.__version__} has no model {cfg.timm_model!r}")
    if cfg.timm_drop_path is not None:
        kwargs["drop_path_rate"] = cfg.timm_drop_path
    return build(lambda: timm.create_model(cfg.timm_model, pretrained=False, **kwargs))


def as_own_vit(timm_cfg: VisionConfig) -> VisionConfig | None:
    """A timm tower that is a plain SigLIP ViT (no class token, attention-pooling head, nothing else
    added, no projection after it) as clipper's own ViT: the same arithmetic (a tie in speed,
    benchmarks/README.md), on the code path clipper's precision, export and training work covers;
    None for any other timm model. The architecture is read off timm's model, built on the meta device."""
    if timm_cfg.timm_pool != "map" or timm_cfg.timm_proj != "none":
        return None
    m = _timm_network(timm_cfg.timm_model)
    if m is None:
        return None
    block, pool = m.blocks[0], m.attn_pool
    plain = (m.cls_token is None and not m.num_reg_tokens and all(
        type(getattr(obj, attr)).__name__ == "Identity" for obj, attr in (
            (m, "norm_pre"), (m, "fc_norm"), (m, "head"), (m, "patch_drop"), (block, "ls1"), (block, "ls2"),
            (block.attn, "q_norm"), (block.attn, "k_norm"), (block.attn, "norm"), (pool, "q_norm")))
        and pool.latent_len == 1 and pool.pool == "token" and pool.pos_embed is None and block.attn.qkv.bias is not None
        and type(m.norm).__name__ == type(pool.norm).__name__ == "LayerNorm" and not m.dynamic_img_size)
    act = type(block.mlp.act).__name__
    acts = {"GELU": "gelu_tanh" if getattr(block.mlp.act, "approximate", "none") == "tanh" else "gelu",
            "GELUTanh": "gelu_tanh"}
    if not plain or act not in acts or m.patch_embed.img_size[0] != m.patch_embed.img_size[1]:
        return None
    width, hidden = m.embed_dim, block.mlp.fc1.out_features
    if pool.mlp.fc1.out_features != hidden or m.norm.eps != pool.norm.eps:
        return None
    return dataclasses.replace(
        timm_cfg, kind="vit", image_size=m.patch_embed.img_size[0], patch_size=m.patch_embed.patch_size[0],
        width=width, layers=len(m.blocks), heads=block.attn.num_heads,
        mlp_ratio=mlp_ratio_of(width, hidden),
        pool="map", attn_pool_heads=pool.num_heads, class_token=False, patch_bias=True, projection=False,
        ln_pre=False, act=acts[act], norm_eps=m.norm.eps)


@functools.lru_cache(maxsize=None)
def _timm_network(name: str):
    try:
        timm = _timm()
    except ConfigError:
        return None
    if not timm.is_model(name):
        return None
    with torch.device("meta"), SkipMetaInit():
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="map")


class TimmTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()  # quick_gelu: timm models choose their own activation (as in open_clip)
        self.cfg = cfg
        attn_pool = cfg.timm_pool in ("abs_attn", "rot_attn")
        if cfg.timm_proj in ("", "none") and not attn_pool:
            # timm's classifier is the projection (""), or the pooled trunk output is the embedding ("none")
            self.trunk = _create(cfg, num_classes=0 if cfg.timm_proj == "none" else embed_dim,
                                 global_pool=cfg.timm_pool)
            width = embed_dim
        else:
            self.trunk = _create(cfg)
            if attn_pool:
                self.trunk.reset_classifier(0, global_pool="")
            else:
                self.trunk.reset_classifier(0, **({"global_pool": cfg.timm_pool} if cfg.timm_pool else {}))
            width = self.trunk.num_features
        from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d

        head: OrderedDict[str, nn.Module] = OrderedDict()
        if cfg.timm_pool == "abs_attn":
            head["pool"] = AttentionPool2d(width, feat_size=self.trunk.default_cfg.get("pool_size"),
                                           out_features=embed_dim)
            width = embed_dim
        elif cfg.timm_pool == "rot_attn":
            head["pool"] = RotAttentionPool2d(width, out_features=embed_dim)
            width = embed_dim
        if cfg.timm_proj == "linear":
            head["drop"] = nn.Dropout(cfg.timm_drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=cfg.timm_proj_bias)
        elif cfg.timm_proj == "mlp":
            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(cfg.timm_drop, 0), bias=(True, cfg.timm_proj_bias))
        self.head = nn.Sequential(head)
        self._fusable = any(hasattr(m, "reparameterize") for m in self.trunk.modules())
        self._fused: list = []  # [weights key, fused copy of the trunk]: not a submodule, never saved

    def _inference_trunk(self) -> nn.Module:
        """The trunk for this forward: a fused copy in inference, rebuilt whenever a weight changed."""
        if not self._fusable or self.training or torch.is_grad_enabled():
            return self.trunk
        if torch.compiler.is_exporting():  # a traced graph: the copy the forward before it built
            return self._fused[1] if self._fused else self.trunk
        key = tuple((id(p), p._version, p.device, p.dtype) for p in self.trunk.parameters())
        if not self._fused or self._fused[0] != key:
            from timm.utils.model import reparameterize_model

            self._fused[:] = [key, reparameterize_model(copy.deepcopy(self.trunk).eval())]
        return self._fused[1]

    @staticmethod
    def token_shape(cfg: VisionConfig, embed_dim: int) -> tuple[int, int]:
        """(count, width) of `tokens`: the trunk's feature map or token sequence (found on the meta device)."""
        with torch.device("meta"), SkipMetaInit():
            trunk = _timm().create_model(cfg.timm_model, pretrained=False, num_classes=0)
            shape = trunk.forward_features(torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size)).shape
        return (shape[2] * shape[3], shape[1]) if len(shape) == 4 else (shape[1], shape[2])

    def init_weights(self) -> None:
        """timm initialises its model when it builds it; open_clip leaves the head at PyTorch's init."""

    def _features(self, images: torch.Tensor, trunk: nn.Module) -> torch.Tensor:
        check_images(self.cfg, images)
        return trunk.forward_features(images)

    @staticmethod
    def _as_tokens(features: torch.Tensor) -> torch.Tensor:
        return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # NCHW -> [B, HW, C]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What a caption decoder reads: the trunk's features before pooling [B, N, width]."""
        return self._as_tokens(self._features(images, self._inference_trunk()))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self._inference_trunk()
        features = self._features(images, trunk)
        return self.head(trunk.forward_head(features)), self._as_tokens(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S], normalised -> features [B, embed_dim]."""
        trunk = self._inference_trunk()
        return self.head(trunk.forward_head(self._features(images, trunk)))
