"""The feature-statistics style perturbation (DSU, issue #18): it changes the channel statistics of
the chosen images and nothing else, only while training, the same under the same seed."""

import pytest
import torch

from clipper.config import ModelConfig, VisionConfig
from clipper.errors import ConfigError
from clipper.feature_style import add_feature_style, perturb
from clipper.model import CLIP


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True, unbiased=False)


def test_perturb_redraws_the_statistics_of_the_chosen_images_only():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 5, 5) * torch.rand(64, 8, 1, 1) * 3 + torch.randn(64, 8, 1, 1)
    assert torch.equal(perturb(x, 0.0), x)
    torch.manual_seed(1)
    y = perturb(x, 1.0)
    torch.manual_seed(1)
    assert torch.equal(perturb(x, 1.0), y)  # seeded by torch's RNG
    # the shapes stay: each channel of each image is its old self scaled (or flat, where the drawn
    # deviation fell below zero), never flipped
    flat = y.std(dim=(2, 3)) < 1e-5
    assert flat.float().mean() < 0.2
    assert torch.allclose(_standardised(y)[~flat], _standardised(x)[~flat], atol=1e-3)
    shift = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs()
    assert shift.mean() > 0.1 * x.mean(dim=(2, 3)).std(dim=0).mean()  # as wide as the batch's spread
    torch.manual_seed(2)
    half = perturb(x, 0.5)
    changed = (half != x).flatten(1).any(dim=1)
    assert 16 < changed.sum() < 48  # about half the images, each whole or not at all
    assert torch.equal(half[~changed], x[~changed])


def test_the_hook_acts_while_training_only_and_names_towers_it_cannot_take():
    torch.manual_seed(0)
    model = CLIP(ModelConfig(embed_dim=16, vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=1,
                                                              heads=2)))
    images = torch.randn(6, 3, 16, 16)
    model.eval()
    before = model.visual(images)
    handle = add_feature_style(model.visual, 1.0)
    assert torch.equal(model.visual(images), before)  # eval: untouched
    model.train()
    assert not torch.allclose(model.visual(images), before, atol=1e-4)
    handle.remove()
    assert torch.allclose(model.visual(images), before, atol=1e-5)

    class Other(torch.nn.Module):
        pass

    with pytest.raises(ConfigError, match="feature_style.*Other"):
        add_feature_style(Other(), 0.5)
