"""Inference anywhere (issue #19): ONNX export checked against clipper, the ONNX runtime behind
embed / search / serve, int8 graphs, and the precision switch (bf16 only where it is native)."""

import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import clipper  # noqa: E402
from clipper.cli import main  # noqa: E402
from clipper.embed import embed_images, embed_texts  # noqa: E402
from clipper.errors import ConfigError  # noqa: E402
from clipper.interop.onnx_model import OnnxCLIP  # noqa: E402
from clipper.precision import native_bf16, resolve_precision  # noqa: E402
from clipper.quantize import with_precision  # noqa: E402

TEXTS = ["a", "a red square on a white ground", "two blue circles and a green triangle next to a tree"]


def _cos_dist(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = clipper.CLIP(clipper.preset("fmnist-tiny")).eval()  # a ViT CLIP with a 1-channel tower
    model.save(tmp / "model")
    (tmp / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)).save(tmp / "imgs" / f"{i}.png")
    assert main(["export", "--model", str(tmp / "model"), "--format", "onnx", "--out", str(tmp / "exp")]) == 0
    return {"tmp": tmp, "model": model, "exp": tmp / "exp"}


def test_export_writes_graphs_and_a_manifest_a_runtime_can_follow(exported):
    manifest = json.loads((exported["exp"] / "onnx_export.json").read_text())
    assert sorted(p.name for p in exported["exp"].iterdir()) == ["image.onnx", "onnx_export.json", "text.onnx"]
    assert manifest["graphs"]["text"]["shape"] == ["batch", "length"]
    assert manifest["preprocess"]["image_size"] == 28 and manifest["preprocess"]["channels"] == "L"
    assert manifest["tokenizer"]["context_length"] == 16
    assert max(manifest["verified"]["max_cosine_distance"].values()) <= 1e-5
    assert not list(exported["tmp"].glob(".exp.tmp-*"))  # written under a temporary name, then renamed


def test_onnx_runtime_equals_torch_on_every_batch_and_length(exported):
    model, onnx = exported["model"], clipper.load(exported["exp"])
    assert isinstance(onnx, OnnxCLIP) and onnx.fingerprint() == model.fingerprint()
    for texts in (TEXTS, TEXTS[:1], TEXTS * 3):  # batches whose longest text differs: dynamic length
        assert _cos_dist(embed_texts(onnx, texts), embed_texts(model, texts)) <= 1e-5
    images = sorted((exported["tmp"] / "imgs").iterdir())
    for batch in (1, 2):
        assert _cos_dist(embed_images(onnx, images, batch_size=batch), embed_images(model, images)) <= 1e-5
    logits_onnx = onnx.scale() * torch.from_numpy(embed_images(onnx, images[:2])) @ torch.from_numpy(
        embed_texts(onnx, TEXTS)).T
    logits = model.scale() * torch.from_numpy(embed_images(model, images[:2])) @ torch.from_numpy(
        embed_texts(model, TEXTS)).T
    assert torch.allclose(logits_onnx, logits.detach(), atol=1e-3)


def test_cli_embeds_with_the_onnx_runtime_and_searches_with_torch(exported, capsys):
    tmp = exported["tmp"]
    assert main(["embed", str(tmp / "imgs"), "--model", str(exported["exp"]), "--runtime", "onnx",
                 "--out", str(tmp / "emb_onnx"), "--dtype", "float32", "--workers", "0"]) == 0
    assert main(["embed", str(tmp / "imgs"), "--model", str(tmp / "model"), "--out", str(tmp / "emb_torch"),
                 "--dtype", "float32", "--workers", "0"]) == 0
    a, b = np.load(tmp / "emb_onnx" / "img_emb.npy"), np.load(tmp / "emb_torch" / "img_emb.npy")
    assert a.shape == b.shape and _cos_dist(a, b) <= 1e-5
    assert main(["index", str(tmp / "emb_onnx")]) == 0
    capsys.readouterr()
    # same fingerprint: the torch model may query what the ONNX graphs embedded
    assert main(["search", str(tmp / "emb_onnx"), "a red square", "--model", str(tmp / "model"), "-k", "2",
                 "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_runtime_and_precision_mismatches_are_one_line(exported, capsys):
    tmp = exported["tmp"]
    for argv, message in (
            (["embed", str(tmp / "imgs"), "--model", str(tmp / "model"), "--runtime", "onnx", "--out", str(tmp / "x")],
             "needs a folder from `clipper export"),
            (["embed", str(tmp / "imgs"), "--model", str(exported["exp"]), "--runtime", "torch", "--out",
              str(tmp / "x")], "runs with --runtime onnx only"),
            (["embed", str(tmp / "imgs"), "--model", str(exported["exp"]), "--precision", "int8", "--out",
              str(tmp / "x")], "run as exported"),
            (["convert", "--model", str(exported["exp"]), "--out", str(tmp / "y")], "holds graphs"),
            (["caption", str(tmp / "imgs"), "--model", str(exported["exp"])], "holds the two towers only")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if not native_bf16("cpu"):  # the machine this runs on decides which branch is tested
        assert main(["classify", str(tmp / "imgs"), "--model", str(tmp / "model"), "--labels", "a,b",
                     "--precision", "bf16"]) == 2
        assert "no native bf16" in capsys.readouterr().err
        assert resolve_precision("auto", "cpu") == "fp32"
    else:
        assert resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_precision("int8", "cuda")


def test_bf16_inference_stays_close_to_fp32_and_returns_float32(exported):
    fp32 = exported["model"]
    bf16 = with_precision(clipper.load(exported["tmp"] / "model"), "bf16")  # forced: the numbers, not the speed
    images = sorted((exported["tmp"] / "imgs").iterdir())
    a, b = embed_images(bf16, images, to_numpy=False), embed_images(fp32, images, to_numpy=False)
    assert a.dtype == torch.float32 and _cos_dist(a, b) < 1e-3
    assert _cos_dist(embed_texts(bf16, TEXTS), embed_texts(fp32, TEXTS)) < 1e-3


def test_int8_graphs_and_serving_them(exported, tmp_path, capsys):
    assert main(["export", "--model", str(exported["exp"]), "--quantize", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert "int8" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "int8" / "onnx_export.json").read_text())
    assert manifest["quantize"] == "int8" and manifest["verified"]["tolerance"] is None
    assert manifest["model_fingerprint"] != exported["model"].fingerprint()  # its vectors are not the fp32 ones
    onnx = clipper.load(tmp_path / "int8", precision="int8")
    assert _cos_dist(embed_texts(onnx, TEXTS), embed_texts(exported["model"], TEXTS)) < 0.05

    pytest.importorskip("fastapi")
    from clipper.serve.service import Service
    from clipper.serve.testing import serve_in_thread

    url, stop = serve_in_thread(Service(onnx, "int8"))
    try:
        req = urllib.request.Request(url + "/v1/embeddings", data=json.dumps({"input": TEXTS}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            served = np.array([row["embedding"] for row in json.load(r)["data"]])
    finally:
        stop()
    assert _cos_dist(served, embed_texts(onnx, TEXTS)) <= 1e-6
