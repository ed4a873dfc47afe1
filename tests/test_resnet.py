"""OpenAI's ModifiedResNet towers (RN50 ... RN50x64): open_clip's embeddings on the same weights,
exact export, the architecture read from a file's tensors, frozen batch-norm statistics when the
tower is locked, and a caption decoder on its attention-pool tokens."""

import open_clip
import pytest
import torch

import clipper
from clipper.config import DecoderConfig
from clipper.presets import from_open_clip_config, preset
from clipper.generate import GenerationConfig, generate
from clipper.interop.open_clip import config_from_open_clip_state_dict, from_open_clip_state_dict, to_open_clip_state_dict


def _with_statistics(model):
    """Batch norms with non-trivial statistics and gains (a random init has mean 0, var 1, gain 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
    return model


@pytest.mark.parametrize("name", ["RN50-quickgelu"])
def test_resnet_embeddings_and_export_are_open_clips(name):
    torch.manual_seed(0)
    oc = _with_statistics(open_clip.create_model(name).eval())
    ours = from_open_clip_state_dict(oc.state_dict(), preset(name)).eval()
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.tokenize(["a photo of a cat.", "", "a dog!!"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images, normalize=True), oc.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens, normalize=True), oc.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)
    exported = to_open_clip_state_dict(ours)
    assert set(exported) == set(oc.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in oc.state_dict().items())
    inferred = config_from_open_clip_state_dict(oc.state_dict(), quick_gelu=preset(name).quick_gelu)
    assert inferred == preset(name)


SMALL_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
            "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1}}


def test_locked_resnet_keeps_its_statistics_and_decodes_captions():
    torch.manual_seed(0)
    model = clipper.CLIP(from_open_clip_config("small-rn", SMALL_RN))
    model.visual.requires_grad_(False)
    model.train()
    assert not model.visual.training and model.text.training  # batch norm of a frozen tower stays in eval
    before = model.visual.bn1.running_mean.clone()
    model.encode_image(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.visual.bn1.running_mean, before)
    model.visual.requires_grad_(True)
    model.train()
    model.encode_image(torch.randn(4, 3, 64, 64))
    assert not torch.equal(model.visual.bn1.running_mean, before)
    # a caption decoder reads the attention pool at every position (1 + 2 x 2 tokens of embed_dim)
    model.add_decoder(DecoderConfig(width=16, layers=1, heads=2, context_length=8))
    model.eval()
    pixels = torch.randn(2, 3, 64, 64)
    assert model.visual.tokens(pixels).shape == (2, 5, 32)
    feats, tokens = model.visual.encode(pixels)
    torch.testing.assert_close(feats, model.visual(pixels), atol=1e-5, rtol=0)
    cfg = dict(max_new_tokens=4)
    assert generate(model, pixels, None, GenerationConfig(**cfg)) == \
        generate(model, pixels, None, GenerationConfig(use_cache=False, **cfg))
