"""clipper.load over its sources, and the CLI verbs of the core."""

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipper
from clipper import CheckpointError, ConfigError
from clipper.cli import main


def test_preset_random_init_is_seeded_and_in_eval_mode():
    torch.manual_seed(3)
    a = clipper.load("emoji-small")
    torch.manual_seed(3)
    b = clipper.load("emoji-small")
    assert not a.training and torch.equal(a.visual.proj, b.visual.proj)


def test_pretrained_file_with_named_architecture(tmp_path, open_clip_models):
    oc = open_clip_models("ViT-S-32")
    path = tmp_path / "vit-s-32.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    model = clipper.load("ViT-S-32", pretrained=path)
    tokens = open_clip.tokenize(["a photo of a dog."])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), oc.encode_text(tokens), atol=1e-5)


def test_pretrained_tag_goes_through_open_clip_download(tmp_path, monkeypatch, open_clip_models):
    """A tag is resolved and fetched by open_clip's own code; its QuickGELU and normalisation apply."""
    oc = open_clip_models("ViT-S-32")
    path = tmp_path / "downloaded.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    seen = {}

    def fake_download(cfg, cache_dir=None):  # stands in for the network only
        seen["cfg"] = cfg
        return str(path)

    from clipper import factory

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    monkeypatch.setattr(factory, "reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda name, tag: {"hf_hub": "x/y/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5),
                                           "std": (0.25, 0.25, 0.25)} if (name, tag) == ("ViT-S-32", "demo") else {})
    model = clipper.load("ViT-S-32", pretrained="demo")
    assert seen["cfg"]["hf_hub"] == "x/y/"
    assert model.config.quick_gelu and model.config.vision.image_std == (0.25, 0.25, 0.25)
    with pytest.raises(ConfigError, match="not a file, and not an open_clip pretrained tag of ViT-S-32"):
        clipper.load("ViT-S-32", pretrained="no-such-tag")


def test_real_open_clip_tag_lookup():
    import open_clip as oc_mod

    cfg = oc_mod.get_pretrained_cfg("ViT-B-32", "openai")
    assert cfg.get("quick_gelu") is True  # the tag clipper reads QuickGELU from


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="neither a clipper preset"):
        clipper.load("nope-model")
    with pytest.raises(CheckpointError, match="not a clipper model directory"):
        clipper.load(tmp_path)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_convert_both_ways_and_info(tmp_path, capsys):
    torch.manual_seed(0)
    src = clipper.load("fmnist-tiny")
    src.save(tmp_path / "m")
    code, out, _ = _run(capsys, "convert", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "oc.pt"))
    assert code == 0 and "open_clip state dict" in out
    code, _, _ = _run(capsys, "convert", "--model", "fmnist-tiny", "--pretrained", str(tmp_path / "oc.pt"),
                      "--out", str(tmp_path / "back"))
    assert code == 0
    back = clipper.load(tmp_path / "back")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in src.state_dict().items())
    code, out, _ = _run(capsys, "info", "--model", str(tmp_path / "back"))
    info = json.loads(out)
    assert code == 0 and info["config"]["vision"]["in_channels"] == 1
    assert info["parameters"]["total"] == sum(p.numel() for p in src.parameters())


def test_cli_similarity(tmp_path, capsys):
    for color in ["red", "blue"]:
        Image.new("RGB", (40, 30), color).save(tmp_path / f"{color}.png")
    code, out, _ = _run(capsys, "similarity", "--model", "emoji-small", str(tmp_path / "red.png"),
                        str(tmp_path / "blue.png"), "--texts", "a red square", "a blue square")
    assert code == 0 and "red.png" in out and "blue.png" in out and out.count("p=") == 4


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "fake.png").write_text("not an image")
    clipper.load("emoji-small").save(tmp_path / "m")  # a model of its own: no random-weights warning
    code, _, err = _run(capsys, "similarity", "--model", str(tmp_path / "m"), str(tmp_path / "fake.png"), "--texts", "x")
    assert code == 2 and "fake.png: not an image" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "similarity", "--model", "emoji-small", str(tmp_path / "fake.png"), "--texts", "x")
    assert code == 2 and "random weights" in err.splitlines()[0]
    code, _, err = _run(capsys, "info", "--model", "nope")
    assert code == 2 and err.startswith("clipper info: error:")


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "clipper", "convert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--out" in out.stdout


def test_offline_hub_tag_fails_fast_and_finds_the_local_cache(tmp_path, monkeypatch):
    """Without a network, a pretrained tag is looked up in the local cache and fails at once (no
    minute of open_clip retries); a cached file is found without the network."""
    import time

    import open_clip

    from clipper import factory

    monkeypatch.setattr(factory, "reachable", lambda host, timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="cannot be reached .* not in the local cache"):
        clipper.load("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    # the Hugging Face cache layout: models--org--name/refs/main -> snapshots/<revision>/<file>
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    repo = tag["hf_hub"].rstrip("/")
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    host, cached = factory._cache_lookup(tag, str(tmp_path))
    assert host == "huggingface.co" and cached == snapshot / "open_clip_model.safetensors"


def test_preprocess_and_tokenize_make_what_encode_takes(tmp_path):
    """The tour's low-level path (preprocess -> encode_image, tokenize -> encode_text) gives the
    verbs' embeddings, from paths and PIL images alike."""
    import numpy as np
    from PIL import Image

    model = clipper.load("fmnist-tiny")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 33, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    pixels = model.preprocess([tmp_path / "a.png", image])
    assert pixels.shape == (2, 1, 28, 28) and pixels.dtype == torch.float32
    with torch.no_grad():
        assert np.array_equal(model.encode_image(pixels, normalize=True).numpy(), model.embed_images([image, image]))
        texts = ["a dress", "an ankle boot"]
        assert np.array_equal(model.encode_text(model.tokenize(texts), normalize=True).numpy(), model.embed_texts(texts))
