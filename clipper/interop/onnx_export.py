"""`clipper export --format onnx`: a model's two towers as ONNX graphs that run without torch.

The folder holds image.onnx (pixels [batch, C, S, S] float32 -> L2-normalised embeddings
[batch, D]), text.onnx (token ids [batch, length] int64 -> embeddings [batch, D]; the length is
dynamic, so a runtime feeds each batch only up to its longest text) and onnx_export.json: how to
preprocess images and tokenize texts (what a runtime in another language needs), the
temperature, the clipper config (for `clipper.load` with `--runtime onnx`) and the figures of the
check made at export: each graph against clipper on the same inputs.

Graphs come from torch.export (torch.onnx.export with dynamo=True); the model's code sees
`torch.compiler.is_exporting()` and keeps every position and one attention op, so the graph
serves every batch size and length. The caption decoder is not exported (its KV-cache loop is
the generation engine's), nor are int8 torch models: export fp32 and pass `quantize="int8"`
(ONNX Runtime's dynamic quantiser).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..io import write_json
from ..model import CLIP
from .onnx_model import FORMAT, MANIFEST, OnnxCLIP, require_onnx, session
from ..tokenizer import Tokenizer

OPSET = 18
MAX_BATCH = 1 << 16
# fp32 graphs must match clipper within this cosine distance (issue #19); int8 ones are reported only
FP32_TOLERANCE = 1e-5


class _Normalized(nn.Module):
    """A tower whose features come out L2-normalised: what each graph computes."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(x), dim=-1)


def fixed_text_length(model) -> bool:
    """CoCa's class token sits after the padded text (its position is the padded length), and a
    bidirectional or last-position tower (SigLIP) sees the padding: their text graphs take full-length
    rows only; causal towers take any length."""
    t = model.config.text
    return t.pool in ("cls", "last") or t.bidirectional


def _samples(model, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [3, C, S, S] and token ids [3, L] to trace and to check with: texts of different lengths."""
    v, context = model.config.vision, model.config.text.context_length
    pixels = torch.randn(3, v.in_channels, v.image_size, v.image_size, generator=generator)
    vocab = model.config.text.vocab_size
    tok = Tokenizer(context)
    lengths = [2, min(context, 7), context]
    ids = torch.zeros(3, context, dtype=torch.long)
    for row, n in enumerate(lengths):  # random ids between start and end, end = the largest id
        body = torch.randint(1, min(vocab, tok.eot_id) - 1, (n - 2,), generator=generator)
        ids[row, :n] = torch.cat([torch.tensor([min(tok.sot_id, vocab - 2)]), body, torch.tensor([vocab - 1])])
    return pixels, ids


def _export(graph: nn.Module, example: torch.Tensor, name: str, dims: dict, path: Path) -> None:
    # the exporter narrates its steps on stdout; a failure is raised, so nothing is lost
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(graph.eval(), (example,), str(path), dynamo=True, opset_version=OPSET,
                          input_names=[name], output_names=["embeddings"], dynamic_shapes=(dims,),
                          external_data=False)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((1 - (a * b).sum(1)).max())


def export_onnx(model: CLIP, out: str | os.PathLike, quantize: str | None = None, seed: int = 0) -> dict:
    """Write `model`'s ONNX folder into `out` (replaced whole, atomically) and return its manifest."""
    require_onnx()
    if getattr(model, "precision", "fp32") != "fp32":
        raise ConfigError(f"export: the model runs in {model.precision}; export the fp32 model "
                          "(quantize the graphs with --quantize int8)")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize: int8 or none, got {quantize!r}")
    model = model.float().cpu().eval()
    cfg = model.config
    pixels, ids = _samples(model, torch.Generator().manual_seed(seed))
    with _replaced_whole(Path(out)) as tmp:
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        text_dims = {0: batch} if fixed_text_length(model) else {
            0: batch, 1: torch.export.Dim("length", min=2, max=cfg.text.context_length)}
        with torch.no_grad():
            model.visual(pixels[:1])  # a tower with an inference form (timm's fused MobileOne blocks) builds it
            _export(_Normalized(model.visual), pixels, "pixels", {0: batch}, tmp / "image.onnx")
            _export(_Normalized(model.text), ids, "ids", text_dims, tmp / "text.onnx")
            if quantize == "int8":
                _quantize_int8(tmp)
            verified = _verify(model, tmp, pixels, ids, quantize)
        manifest = _manifest(model, quantize, verified)
        write_json(tmp / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _replaced_whole(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it when the block succeeds (removed if not):
    a reader never sees half an export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_onnx_export(source: str | os.PathLike, out: str | os.PathLike) -> dict:
    """int8 graphs (ONNX Runtime's dynamic quantiser) from an fp32 export folder, without the
    model: checked against the fp32 graphs, written to `out` atomically; returns the manifest."""

    require_onnx()
    fp32 = OnnxCLIP(source)
    if fp32.precision != "fp32":
        raise ConfigError(f"{source}: already {fp32.precision}; quantise an fp32 export")
    with _replaced_whole(Path(out)) as tmp:
        for name in ("image.onnx", "text.onnx"):
            shutil.copyfile(Path(source) / name, tmp / name)
        _quantize_int8(tmp)
        pixels, ids = _samples(fp32, torch.Generator().manual_seed(0))
        manifest = {**fp32.manifest, "quantize": "int8", "model_fingerprint": fp32.fingerprint() + "-onnx-int8",
                    "verified": _verify(fp32, tmp, pixels, ids, "int8")}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _quantize_int8(folder: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graphs is for static quantisation
    try:
        for name in ("image.onnx", "text.onnx"):
            fp32 = folder / f"{name}.fp32"
            os.rename(folder / name, fp32)
            quantize_dynamic(str(fp32), str(folder / name), weight_type=QuantType.QInt8)
            fp32.unlink()
    finally:
        root.setLevel(level)


def _verify(model, folder: Path, pixels: torch.Tensor, ids: torch.Tensor, quantize: str | None) -> dict:
    """Each graph against `model` (clipper, or the fp32 graphs for quantised ones) on the trace
    inputs and on other batch sizes and lengths: the largest cosine distance; fp32 graphs over
    FP32_TOLERANCE are an error (a bad export)."""
    image, text = session(folder / "image.onnx"), session(folder / "text.onnx")
    checks = {"image": [], "text": []}
    for rows in (pixels, pixels[:1], torch.cat([pixels, pixels.flip(0)])):
        ours = model.encode_image(rows, normalize=True).numpy()
        checks["image"].append(_cosine_distance(image.run(None, {"pixels": rows.numpy()})[0], ours))
    batches = [ids, ids[:1], ids[:2]]
    if not fixed_text_length(model):  # rows cut after their batch's longest text, as runtimes feed them
        batches = [b[:, :int(b.argmax(1).max()) + 1] for b in batches]
    for rows in batches:
        ours = model.encode_text(rows, normalize=True).numpy()
        checks["text"].append(_cosine_distance(text.run(None, {"ids": rows.numpy()})[0], ours))
    worst = {k: max(v) for k, v in checks.items()}
    if quantize is None and max(worst.values()) > FP32_TOLERANCE:
        raise ConfigError(f"export: the ONNX graphs differ from clipper (cosine distance image {worst['image']:.2e}, "
                          f"text {worst['text']:.2e}; tolerance {FP32_TOLERANCE:g}): not written")
    return {"max_cosine_distance": worst, "tolerance": None if quantize else FP32_TOLERANCE}


def _tokenizer_manifest(model: CLIP) -> dict:
    t = model.config.text
    if t.tokenizer:  # described, not loaded: exporting needs no tokenizer files
        return {"kind": "huggingface (open_clip.tokenizer.HFTokenizer)", "name": t.tokenizer, "clean": t.tokenizer_clean,
                "strip_sep_token": t.tokenizer_strip_sep, "context_length": t.context_length,
                "truncate": "to context_length", "feed": "each row padded to context_length with the pad token"}
    tok = Tokenizer(t.context_length)
    return {"kind": "clip-bpe (open_clip.tokenizer.SimpleTokenizer: lower-cased, whitespace cleaned)",
            "context_length": t.context_length, "sot": tok.sot_id, "eot": tok.eot_id, "pad": 0,
            "truncate": "keep the first context_length - 1 ids, then end-of-text",
            "feed": "each row padded with 0 to its batch's longest text" if not fixed_text_length(model)
            else "each row padded with 0 to context_length"}


def _manifest(model: CLIP, quantize: str | None, verified: dict) -> dict:
    cfg = model.config
    v = cfg.vision
    return {
        "format": FORMAT, "version": 1,
        "graphs": {
            "image": {"file": "image.onnx", "input": "pixels", "shape": ["batch", v.in_channels, v.image_size,
                                                                          v.image_size], "dtype": "float32"},
            "text": {"file": "text.onnx", "input": "ids", "dtype": "int64",
                     "shape": ["batch", cfg.text.context_length if fixed_text_length(model) else "length"]},
            "output": {"name": "embeddings", "shape": ["batch", cfg.embed_dim], "dtype": "float32",
                       "normalized": True},
        },
        "preprocess": {"image_size": v.image_size, "resize": (f"shortest side to image_size, {v.interpolation}, then centre crop" if v.resize == "shortest"
                                  else f"squashed to image_size x image_size, {v.interpolation}"),
                       "channels": "RGB" if v.in_channels == 3 else "L", "scale": 1 / 255,
                       "mean": list(v.image_mean), "std": list(v.image_std)},
        "tokenizer": _tokenizer_manifest(model),
        "logit_scale": float(model.scale().detach()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "quantize": quantize,
        "model_fingerprint": model.fingerprint() + ("" if quantize is None else f"-onnx-{quantize}"),
        "config": cfg.to_dict(),
        "verified": verified,
        "exported_with": {"clipper": _version(), "torch": torch.__version__, "opset": OPSET},
    }


def _version() -> str:
    from ..version import __version__

    return __version__


def describe(manifest: dict, out: str | os.PathLike) -> str:
    """One line for the CLI."""
    d = manifest["verified"]["max_cosine_distance"]
    return (f"wrote {out}: image.onnx, text.onnx ({manifest['quantize'] or 'fp32'}), {MANIFEST}; max cosine distance "
            f"to clipper: image {d['image']:.1e}, text {d['text']:.1e}")

