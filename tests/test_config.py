import json

import open_clip
import pytest

from clipper import ConfigError, ModelConfig, list_presets, preset
from clipper.presets import from_open_clip_config


def test_json_round_trip(tmp_path):
    for name in ["fmnist-tiny", "emoji-small", "ViT-B-32"]:
        cfg = preset(name)
        cfg.to_json(tmp_path / "c.json")
        assert ModelConfig.from_json(tmp_path / "c.json") == cfg


def test_own_presets():
    f = preset("fmnist-tiny")
    assert (f.vision.image_size, f.vision.in_channels) == (28, 1)
    e = preset("emoji-small")
    assert (e.vision.image_size, e.vision.in_channels) == (48, 3)  # the 64 px renders, resized


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-S-32", "ViT-M-32"])
def test_open_clip_presets_follow_open_clip_json(name):
    oc = open_clip.get_model_config(name)
    cfg = preset(name)
    assert cfg.embed_dim == oc["embed_dim"]
    v, t = oc["vision_cfg"], oc["text_cfg"]
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size, cfg.vision.image_size) == (
        v["width"], v["layers"], v["patch_size"], v["image_size"])
    assert cfg.vision.heads == v["width"] // v.get("head_width", 64)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length) == (
        t["width"], t["layers"], t["heads"], t["context_length"])


def test_quickgelu_preset():
    assert preset("ViT-B-32-quickgelu").quick_gelu and not preset("ViT-B-32").quick_gelu


def test_presets_listed():
    names = list_presets()
    for name in ["fmnist-tiny", "emoji-small", "ViT-B-32", "ViT-L-14", "ViT-B-16-quickgelu", "coca_ViT-B-32", "RN50",
                 "coca_ViT-L-14"]:
        assert name in names
    assert "coca_roberta-ViT-B-32" not in names


def test_unknown_field_is_named(tmp_path):
    data = preset("fmnist-tiny").to_dict()
    data["vision"]["widht"] = 3
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"c\.json: model\.vision: unknown field\(s\) widht"):
        ModelConfig.from_json(tmp_path / "c.json")


@pytest.mark.parametrize("section,field,value,message", [
    ("vision", "heads", 5, "not divisible by heads"),
    ("vision", "patch_size", 40, "below patch_size"),
    ("vision", "image_mean", [0.5, 0.5], "2 values for in_channels=1"),
    ("vision", "pool", "max", "pool"),
    ("text", "context_length", 1, "context_length"),
    ("text", "width", "wide", "expected int"),
    ("vision", "layers", 0, "must be positive"),
])
def test_contradictory_or_malformed_fields(section, field, value, message):
    data = preset("fmnist-tiny").to_dict()
    data[section][field] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_unsupported_open_clip_configs_are_refused():
    with pytest.raises(ConfigError, match="not supported"):
        from_open_clip_config("x", open_clip.get_model_config("ViT-B-32") | {"vision_cfg": {"pos_embed_type": "sin_cos_2d"}})
    with pytest.raises(ConfigError, match="neither a clipper preset nor an open_clip"):
        preset("no-such-model")


def test_not_json(tmp_path):
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "c.json")
