"""open_clip's local-dir layout: what `clipper convert --to open_clip` writes, open_clip's
`create_model_and_transforms("local-dir:DIR")` loads as it is, with the same embeddings (a 1-channel
tower too, and non-64-wide heads), and clipper reads back bit for bit; folders open_clip users have
(no clipper section) load too; bad folders fail with one line."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipper
from clipper.cli import main
from clipper.presets import from_open_clip_config
from clipper.errors import ClipperError
from conftest import SMALL_TEXT, SMALL_VISION, small_open_clip

TEXTS = ["a photo of a dress", "a sneaker", ""]


def _images():
    rng = np.random.default_rng(0)
    return (Image.fromarray(rng.integers(0, 256, (40, 33), dtype=np.uint8), "L"),
            Image.fromarray(rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)))


def _compare(model, folder, color_tol):
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        for image, tol in zip(_images(), (1e-6, color_tol)):
            theirs = oc.encode_image(preprocess(image.convert("RGB"))[None], normalize=True)
            assert (theirs - torch.from_numpy(model.embed_images([image]))).abs().max() <= tol
        theirs = oc.encode_text(tokenizer(TEXTS), normalize=True)
        assert (theirs - torch.from_numpy(model.embed_texts(TEXTS))).abs().max() <= 1e-6
    return oc


def test_grayscale_model_exports_for_open_clip_and_back_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    model = clipper.load("fmnist-tiny")  # 1 channel, 4 heads of 32
    model.save(tmp_path / "mine")
    assert main(["convert", "--model", str(tmp_path / "mine"), "--to", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    assert "local-dir" in capsys.readouterr().out
    # an RGB image: open_clip weighs the channels as clipper's grayscale conversion does (up to its rounding)
    oc = _compare(model, tmp_path / "oc", color_tol=2e-3)
    assert oc.visual.conv1.weight.shape[1] == 3 and oc.visual.transformer.resblocks[0].attn.num_heads == 4
    back = clipper.load(tmp_path / "oc")
    assert back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_sigmoid_and_coca_models_export_for_open_clip(tmp_path):
    from test_coca import TINY_COCA

    torch.manual_seed(1)
    siglip_like = clipper.CLIP(from_open_clip_config("s", {"embed_dim": 48, "init_logit_bias": -10.0,
                                                         "vision_cfg": SMALL_VISION | {"pool_type": "avg"},
                                                         "text_cfg": SMALL_TEXT}))
    coca = clipper.CLIP(from_open_clip_config("tiny-coca", TINY_COCA))
    for name, model in (("sig", siglip_like), ("coca", coca)):
        model.eval()
        assert main(["convert", "--model", _saved(model, tmp_path / f"{name}-mine"), "--to", "open_clip",
                     "--out", str(tmp_path / name)]) == 0
        oc = _compare(model, tmp_path / name, color_tol=1e-6)
        assert oc.logit_bias is None if model.logit_bias is None else oc.logit_bias.item() == model.logit_bias.item()
        assert type(oc).__name__ == ("CoCa" if name == "coca" else "CLIP")


def _saved(model, path) -> str:
    model.save(path)
    return str(path)


def test_open_clip_folder_without_clipper_section_loads(tmp_path):
    """A folder as open_clip users have them (e.g. from the hub): model_cfg + preprocess_cfg + weights."""
    oc = small_open_clip()
    cfg = {"embed_dim": 48, "vision_cfg": SMALL_VISION, "text_cfg": SMALL_TEXT}
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, folder / "open_clip_model.safetensors")
    model = clipper.load(folder)
    assert model.config.vision.image_std == (0.25, 0.25, 0.25)
    images = torch.randn(2, 3, SMALL_VISION["image_size"], SMALL_VISION["image_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oc.encode_image(images), atol=1e-5, rtol=0)


def test_bad_open_clip_folders_fail_with_one_line(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 48, "vision_cfg": SMALL_VISION,
                                                                            "text_cfg": SMALL_TEXT}}))
    with pytest.raises(ClipperError, match="no open_clip_model.safetensors"):
        clipper.load(folder)
    (folder / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(ClipperError, match="model_cfg"):
        clipper.load(folder)
