"""What every image tower offers (VisionConfig.kind picks one: clipper.model.vision.VISION_TOWERS).

    Tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool)
    tower(images [B, C, S, S], normalised) -> features [B, embed_dim]   (the embedding, unnormalised)
    tower.tokens(images) -> [B, N, W]        what a caption decoder reads
    tower.encode(images) -> (features, tokens) from one pass
    Tower.token_shape(cfg, embed_dim) -> (N, W), known before any weight exists
    tower.init_weights()                      open_clip's initialisation of the tower's own layers
"""

from __future__ import annotations

import torch

from ..config import VisionConfig


def check_images(cfg: VisionConfig, images: torch.Tensor) -> None:
    """A clear error for input of the wrong shape, before a convolution reports it its own way."""
    if images.ndim != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"images: expected [batch, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                         f"got {list(images.shape)}")
