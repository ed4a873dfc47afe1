"""Style perturbation in feature space (issue #18): DSU (Li et al., "Uncertainty Modeling for
Out-of-Distribution Generalization", 2022) on an image tower's early feature maps.

An image's style lives largely in the per-channel mean and spread of its early features (what
AdaIN style transfer swaps). With two training artists, pixel views only ever show those two
styles; DSU redraws each chosen image's statistics from a Gaussian around its own, as wide as the
statistics vary across the batch, so training sees styles between and beyond the artists' while the
normalised features (the shapes) stay. Training only: the hook does nothing in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

# where each tower's early feature map [B, C, H, W] comes out: the patch embedding of a ViT, the
# first stage of a ResNet (where MixStyle and DSU put it)
SITES = {"VisionTransformer": "patch_embed", "ModifiedResNet": "layer1"}


def perturb(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """x [B, C, H, W]: each image with probability p gets its channel means and deviations redrawn
    (torch's global RNG: a resumed run draws the same)."""
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True)
    sigma = (xf.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    # how much the statistics vary across the batch: the scale of the draw, per channel
    mu_spread = (mu.var(dim=0, keepdim=True) + eps).sqrt()
    sigma_spread = (sigma.var(dim=0, keepdim=True) + eps).sqrt()
    new_mu = mu + torch.randn_like(mu) * mu_spread
    # a negative deviation would flip the channel's contrast: it goes flat instead
    new_sigma = (sigma + torch.randn_like(sigma) * sigma_spread).clamp_min(0)
    chosen = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p).to(xf.dtype)
    out = xf + chosen * ((xf - mu) / sigma * new_sigma + new_mu - xf)
    return out.to(x.dtype)


def add_feature_style(visual: nn.Module, p: float) -> torch.utils.hooks.RemovableHandle:
    """Perturb the image tower's early features with probability p per image while it trains."""
    name = SITES.get(type(visual).__name__)
    if name is None:
        raise ConfigError(f"train.feature_style: not available for a {type(visual).__name__} image tower "
                          f"(only {', '.join(SITES)})")

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return perturb(out, p) if module.training and out.shape[0] > 1 else None

    return getattr(visual, name).register_forward_hook(hook)
