"""Hugging Face transformers checkpoints (issue #16): CLIPModel and SiglipModel folders load with
transformers' embeddings, and `clipper convert --to hf` writes folders transformers loads to the
bit; on random weights from configs written here."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import clipper  # noqa: E402
from clipper.cli import main  # noqa: E402
from clipper.errors import CheckpointError, ConfigError  # noqa: E402
from clipper.interop.hf import save_hf_dir  # noqa: E402

TEXT = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 99}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
KINDS = {"clip": (transformers.CLIPModel, transformers.CLIPConfig, {"projection_dim": 24}),
         "siglip": (transformers.SiglipModel, transformers.SiglipConfig, {})}


def _features(out) -> torch.Tensor:  # transformers 5 wraps them in an output object
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_model(kind: str, tmp_path, **text):
    cls, config_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    model = cls(config_cls(text_config=TEXT | text, vision_config=VISION, **extra)).eval()
    model.save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 16), generator=g)
    ids[:, 5] = 99  # the end token (eos_token_id)
    ids[1, 6:] = 0
    return torch.randn(3, 3, 32, 32, generator=g), ids


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers_folder_loads_with_its_embeddings_and_goes_back_exactly(kind, tmp_path):
    hf, folder = _hf_model(kind, tmp_path)
    ours = clipper.load(folder)
    images, ids = _inputs()
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        assert (norm(_features(hf.get_image_features(pixel_values=images)), dim=-1)
                - ours.encode_image(images, normalize=True)).abs().max() <= 1e-5
        assert (norm(_features(hf.get_text_features(input_ids=ids)), dim=-1)
                - ours.encode_text(ids, normalize=True)).abs().max() <= 1e-5
    assert torch.allclose(ours.scale(), hf.logit_scale.exp().reshape(()))
    assert main(["convert", "--model", str(folder), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    assert back.state_dict().keys() == hf.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_siglip_folder_is_squashed_at_half_statistics_and_reads_its_processor(tmp_path):
    _, folder = _hf_model("siglip", tmp_path)
    v = clipper.load(folder).config.vision
    assert (v.resize, v.image_mean) == ("squash", (0.5, 0.5, 0.5))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7], "resample": 2, "do_center_crop": True}))
    v = clipper.load(folder).config.vision
    assert (v.resize, v.interpolation, v.image_std) == ("shortest", "bilinear", (0.9, 0.8, 0.7))


def test_open_clip_style_model_exports_to_transformers(tmp_path):
    """A clipper model (OpenAI layout, QuickGELU) -> CLIPModel with the same embeddings."""
    from conftest import rgb_tiny

    model = rgb_tiny()
    model.config.quick_gelu = True
    model = clipper.CLIP.from_state_dict(model.config, model.state_dict())  # rebuilt with QuickGELU
    save_hf_dir(model, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.hidden_act == "quick_gelu"
    images = torch.randn(2, 3, 16, 16)
    ids = clipper.Tokenizer(12)(["a red cat", "a dog on a very small mat"])
    with torch.no_grad():
        assert np.allclose(_features(hf.get_image_features(pixel_values=images)), model.encode_image(images), atol=1e-5)
        assert np.allclose(_features(hf.get_text_features(input_ids=ids)), model.encode_text(ids), atol=1e-5)


def test_bad_folders_and_models_are_named(tmp_path):
    _, folder = _hf_model("clip", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "siglip2"}))
    with pytest.raises(ConfigError, match="Siglip2Model"):
        clipper.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    save_file(sd | {"vision_model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="vision_model.extra.weight"):
        clipper.load(folder)
    with pytest.raises(ConfigError, match="transformers has no class"):
        save_hf_dir(clipper.load("fmnist-tiny"), tmp_path / "x")


def test_verbs_run_on_a_siglip_folder_with_its_tokenizer(tmp_path, hf_folder, capsys):
    """A SiglipModel folder holding its tokenizer files: classify, embed and search work from the CLI."""
    import shutil

    from PIL import Image

    _, folder = _hf_model("siglip", tmp_path)
    for f in hf_folder.iterdir():
        shutil.copy(f, folder / f.name)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(photos / f"{i}.png")
    assert main(["classify", str(photos), "--model", str(folder), "--labels", "cat,dog,red mat", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and abs(sum(t["prob"] for t in rows[0]["top"]) - 1) < 1e-4
    assert main(["embed", str(photos), "--model", str(folder), "--out", str(tmp_path / "emb")]) == 0
    assert main(["index", str(tmp_path / "emb")]) == 0
    assert main(["search", str(tmp_path / "emb"), "a red cat", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2
    model = clipper.load(folder)
    assert model.config.text.tokenizer == str(folder)
    ids = clipper.tokenizer.tokenizer_for(model.config.text)(["A red cat!"])
    assert ids.shape == (1, 16) and ids[0, :5].tolist() == [3, 9, 7, 1, 0]  # canonicalised, end token, padded


@pytest.mark.parametrize("model_type,pooler,proj", [("roberta", "mean_pooler", "mlp"), ("bert", "cls_pooler", "linear"),
                                                    ("xlm-roberta", "cls_last_hidden_state_pooler", "linear")])
def test_hf_text_tower_matches_open_clips_adapter(tmp_path, hf_folder, model_type, pooler, proj):
    """open_clip's text towers from transformers (roberta-ViT-B-32, xlm-roberta, ...): built from the
    config in a folder (offline, the hub's would be in the local HF cache), same embeddings, export exact."""
    import open_clip

    from clipper.presets import from_open_clip_config
    from clipper.interop.open_clip import from_open_clip_state_dict, to_open_clip_state_dict

    config = transformers.AutoConfig.for_model(model_type, vocab_size=16, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                               max_position_embeddings=40)
    config.save_pretrained(tmp_path / "text")
    text_cfg = {"hf_model_name": str(tmp_path / "text"), "hf_tokenizer_name": str(hf_folder), "hf_proj_type": proj,
                "hf_pooler_type": pooler, "hf_model_pretrained": False, "context_length": 12}
    vision_cfg = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32}
    torch.manual_seed(0)
    oc = open_clip.CustomTextCLIP(24, vision_cfg, text_cfg).eval()
    ours = from_open_clip_state_dict(oc.state_dict(), from_open_clip_config("x", {
        "embed_dim": 24, "vision_cfg": vision_cfg, "text_cfg": text_cfg})).eval()
    texts = ["a red cat", "the very small dog on a mat", ""]
    tokens = open_clip.tokenizer.HFTokenizer(str(hf_folder), 12)(texts)
    with torch.no_grad():
        assert (oc.encode_text(tokens, normalize=True) - ours.encode_text(tokens, normalize=True)).abs().max() <= 1e-5
    assert np.allclose(ours.embed_texts(texts), oc.encode_text(tokens, normalize=True).detach().numpy(), atol=1e-5)
    exported = to_open_clip_state_dict(ours)
    assert exported.keys() == oc.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in oc.state_dict().items())


def test_hf_text_tower_offline_without_its_config_says_what_to_download(monkeypatch, tmp_path):
    from clipper import hub, presets

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "reachable", lambda host, timeout=3.0: False)
    with pytest.raises(ConfigError, match=r"roberta-base.*not in the local Hugging Face cache.*hf download"):
        clipper.CLIP(presets.preset("roberta-ViT-B-32"))
