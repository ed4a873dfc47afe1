"""Emoji in several renderings (issue #18): npm's emoji-datasource packages read by code points,
the protocol's split applied to the emoji in every style, evaluation-only styles never in train,
and evaluation by style and across styles."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipper.data import emoji, npm
from clipper.errors import PackageError
from clipper.evaluate import cross_style, only_style


def _png(color, size=64) -> bytes:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (size // 2, size // 2), color), (size // 4, size // 4))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def fake_package(tmp_path):
    """A tiny emoji-datasource-apple: 😀 and 👋 with one skin tone, images with transparent margins."""
    entries = [{"unified": "1F600", "image": "1f600.png", "has_img_apple": True},
               {"unified": "1F44B", "image": "1f44b.png", "has_img_apple": True, "skin_variations": {
                   "1F3FD": {"unified": "1F44B-1F3FD", "image": "1f44b-1f3fd.png", "has_img_apple": True}}},
               {"unified": "2764-FE0F", "non_qualified": "2764", "image": "2764-fe0f.png", "has_img_apple": False}]
    files = {"package/emoji.json": json.dumps(entries).encode(), "package/img/apple/64/1f600.png": _png((255, 0, 0)),
             "package/img/apple/64/1f44b.png": _png((0, 0, 255), 32),
             "package/img/apple/64/1f44b-1f3fd.png": _png((0, 255, 0))}
    (tmp_path / "npm").mkdir()
    with tarfile.open(tmp_path / "npm" / f"emoji-datasource-apple-{npm.VERSION}.tgz", "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_package_images_by_code_points_on_white(fake_package):
    images = npm.StyleImages("apple", fake_package)
    assert images.has("😀") and images.has("👋🏽") and not images.has("❤️") and not images.has("🎈")
    red = np.asarray(images.image("😀"))  # a red square in a transparent margin: cropped to it
    assert red.shape == (64, 64, 3) and (red == [255, 0, 0]).all()
    assert images.image("👋").size == (64, 64)  # a 32 px image is resized
    assert (np.asarray(images.image("👋🏽"))[32, 32] == [0, 255, 0]).all()  # the skin-tone variation's own


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(npm.shutil, "which", lambda _: None)
    with pytest.raises(PackageError, match="npm not found.*emoji-datasource-facebook"):
        npm.StyleImages("facebook", tmp_path)


def test_splits_by_style():
    assert emoji.style_split("train", "twemoji") == "train" and emoji.style_split("test", "twemoji") == "test"
    assert emoji.style_split("train", "apple") == "val" and emoji.style_split("test", "facebook") == "test"
    with pytest.raises(Exception, match="styles: sketch"):
        next(emoji.samples("train", styles=("noto", "sketch")))


def _batch(styles, cps, dim=4):
    rng = np.random.default_rng(len(cps))
    return {"image": torch.tensor(rng.standard_normal((len(cps), dim)), dtype=torch.float32),
            "key": [f"k{i}" for i in range(len(cps))], "caption": list(cps), "skipped": [],
            "meta": [{"style": s, "cp": c} for s, c in zip(styles, cps)]}


class _Identity:  # images are their own embeddings: the task's matching is what is tested
    device = torch.device("cpu")

    def encode_image(self, x, normalize=True):
        return torch.nn.functional.normalize(x, dim=-1)


def test_style_filter_and_cross_style_recall():
    batch = _batch(["noto", "apple", "noto", "apple", "twemoji"], ["a", "a", "b", "b", "a"])
    apple = next(only_style([batch], "apple"))
    assert apple["caption"] == ["a", "b"] and apple["image"].shape[0] == 2 and apple["skipped"] == []
    same = _batch(["noto", "apple", "noto", "apple"], ["a", "a", "b", "b"])
    same["image"][1], same["image"][3] = same["image"][0] * 2, same["image"][2] + 1e-3  # apple = noto, scaled
    metrics = cross_style(_Identity(), [same], "apple")
    assert metrics["n"] == 2 and metrics["i2i_R@1"] == 100.0


def test_real_styles_follow_the_protocol():
    """The fetched packages (scripts/test.sh runs `clipper data fetch`): the emoji split holds in
    every style, Apple is never in train, Twemoji covers most of the Noto emoji."""
    try:
        _, drawn, rows = emoji.plan("all", styles=("noto", "twemoji", "apple"))
    except PackageError as e:
        pytest.skip(f"emoji packages unavailable: {e}")
    assert len({(pair.cp, style) for pair, style, _ in rows}) == len(rows)
    for pair, style, split in rows:
        assert (split == "test") == (emoji.split_of(pair.cp) == "test")
        assert split != ("train" if style == "apple" else "val")
    counts = {style: sum(r[1] == style for r in rows) for style in ("noto", "twemoji", "apple")}
    assert counts["twemoji"] > 0.9 * counts["noto"] and counts["apple"] > 0.9 * counts["noto"]
    pig = next(pair for pair, style, _ in rows if pair.name == "pig face" and style == "twemoji")
    image = np.asarray(drawn["twemoji"].image(pig.cp))
    assert image.shape == (64, 64, 3) and image.std() > 20


def _drawing() -> Image.Image:
    """A red disc with a dark outline on white: what an emoji rendering looks like."""
    from PIL import ImageDraw

    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(220, 30, 30), outline=(40, 20, 20), width=3)
    return im


def test_style_views_do_what_they_say_and_are_seeded():
    from clipper.config import VisionConfig
    from clipper.train_config import AugmentConfig
    from clipper.data.transforms import TrainTransform

    vision = VisionConfig(image_size=64, patch_size=8)
    full = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def view(**aug):
        t = TrainTransform(vision, AugmentConfig(**full, **aug))
        t.reseed("k")
        return t(_drawing()).permute(1, 2, 0).numpy().astype(int)

    plain = view()
    gray = view(grayscale=1.0)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    line = view(outline=1.0)
    assert (line[0] == 255).all() and (line[32, 32] == 255).all()  # no frame, no fill: lines only
    assert (line.min(axis=2) < 128).sum() > 50
    painted = view(background=1.0)
    assert (painted[0, 0] != 255).any() and (painted[32, 32] == plain[32, 32]).all()
    hue = view(hue=0.5)
    assert (hue[32, 32] != plain[32, 32]).any() and (hue[0, 0] == 255).all()
    assert (view(posterize=1.0) % 16 == 0).all()  # at most 4 bits a channel
    assert (view(rotate=40) != plain).any() and (view(blur=1.0) != plain).any()
    lit = view(shade=1.0)  # the disc brighter on one side, darker on the other; the white stays white
    assert (lit[0, 0] == 255).all() and (lit[..., 0] != plain[..., 0]).sum() > 100
    assert (lit[:, :, 0] > plain[:, :, 0]).any() and (lit[:, :, 0] < plain[:, :, 0]).any()
    assert (view(hue=0.5, outline=0.5, rotate=10) == view(hue=0.5, outline=0.5, rotate=10)).all()  # seeded


def test_style_options_are_validated():
    from clipper.train_config import AugmentConfig
    from clipper.errors import ConfigError

    for bad in ({"outline": 1.5}, {"hue": 0.7}, {"rotate": -1}, {"shade": 2}):
        with pytest.raises(ConfigError, match="augment"):
            AugmentConfig(**bad).validate()
