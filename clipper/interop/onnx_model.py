"""`--runtime onnx`: an export folder (`clipper.onnx_export`) run by ONNX Runtime behind the part
of CLIP's interface that the inference verbs use (encode_image, encode_text, scale, config,
fingerprint), so embed, classify, search, eval and serve work on it unchanged; and the runtime's
helpers the export checks its graphs with (sessions, the folder's manifest)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..model.clip import MAX_LOGIT_SCALE
from ..model.inputs import ModelInputs
from ..io import read_json_object

MANIFEST = "onnx_export.json"
FORMAT = "clipper-onnx"


class OnnxCLIP(ModelInputs):
    """The two towers of an export folder on ONNX Runtime (CPU). No caption decoder."""

    decoder = None
    device = torch.device("cpu")
    training = False

    def __init__(self, folder: str | os.PathLike):
        require_onnx()
        folder = Path(folder)
        self.manifest = read_export_manifest(folder)
        self.config = ModelConfig.from_dict(self.manifest["config"])
        self.config.decoder = None
        self.precision = self.manifest.get("quantize") or "fp32"
        graphs = self.manifest["graphs"]
        self._image = session(folder / graphs["image"]["file"])
        self._text = session(folder / graphs["text"]["file"])
        self._fixed_length = not isinstance(graphs["text"]["shape"][1], str)
        bias = self.manifest.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))
        self._scale = torch.tensor(min(float(self.manifest["logit_scale"]), MAX_LOGIT_SCALE))

    def eval(self) -> "OnnxCLIP":
        return self

    def train(self, mode: bool = True) -> "OnnxCLIP":  # graphs have no training mode
        return self

    def caption(self, images, prompt=None, **options):
        raise ConfigError("an ONNX export holds the two towers only: caption with the clipper model it came from")

    def fingerprint(self) -> str:
        """The exported model's (fp32 graphs match it within the export's tolerance)."""
        return self.manifest["model_fingerprint"]

    def scale(self) -> torch.Tensor:
        return self._scale

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings of preprocessed images [B, C, S, S], always normalised (the graph does it)."""
        v = self.config.vision
        if images.ndim != 4 or tuple(images.shape[1:]) != (v.in_channels, v.image_size, v.image_size):
            raise ValueError(f"images: expected [batch, {v.in_channels}, {v.image_size}, {v.image_size}], "
                             f"got {list(images.shape)}")
        out = self._image.run(None, {"pixels": np.ascontiguousarray(images.float().cpu().numpy())})[0]
        return torch.from_numpy(out)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings of token ids [B, L], always normalised: fed up to the batch's longest text (the graph's
        length is dynamic), or whole for a fixed-length graph (CoCa)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [batch, length], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if not len(tokens):
            return torch.empty(0, self.config.embed_dim)
        if not self._fixed_length:
            tokens = tokens[:, :int(tokens.argmax(1).max()) + 1]
        out = self._text.run(None, {"ids": np.ascontiguousarray(tokens.long().cpu().numpy())})[0]
        return torch.from_numpy(out)


def load_onnx(folder: str | os.PathLike, precision: str = "fp32") -> OnnxCLIP:
    """An export folder on ONNX Runtime; its graphs run as exported (fp32 or int8)."""
    model = OnnxCLIP(folder)
    if precision not in ("fp32", "auto", model.precision):
        raise ConfigError(f"{folder}: ONNX graphs run as exported ({model.precision}), not {precision}; export "
                          "again with --quantize int8 for int8")
    return model


def require_onnx() -> None:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        raise ConfigError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'clipper[onnx]'")


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_export_manifest(folder: str | os.PathLike) -> dict:
    """onnx_export.json of an export folder, checked for the fields the runtime reads."""
    path = Path(folder) / MANIFEST
    manifest = read_json_object(path, "ONNX export manifest", {"format": str, "graphs": dict, "config": dict,
                                                                "logit_scale": (int, float),
                                                                "model_fingerprint": str})
    if manifest["format"] != FORMAT:
        raise ConfigError(f"{path}: format {manifest['format']!r} is not {FORMAT!r}")
    return manifest


def is_onnx_export(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
