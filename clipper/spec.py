"""A model spec: what `clipper.load` needs to load a model again, as the CLI's model flags give it,
`embed.json` stores it (so that `clipper search` embeds queries with the same model) and the
server names it. One object for the three, with the one rule for where a model runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .factory import load
from .interop.onnx_model import is_onnx_export
from .precision import inference_device


@dataclass
class ModelSpec:
    model: str  # model folder, ONNX export folder, open_clip file, or preset name
    pretrained: str | None = None  # with a preset: an open_clip tag or a weights file
    quick_gelu: bool | None = None
    precision: str = "fp32"
    runtime: str | None = None  # torch or onnx (default: what `model` is)
    tokenizer: str | None = None  # a Hugging Face tokenizer folder in place of the model's own

    def resolved(self) -> "ModelSpec":
        """The spec with the paths it names made absolute (a folder embedded here is searched from anywhere)."""
        def absolute(path: str | None) -> str | None:
            return str(Path(path).resolve()) if path and Path(path).exists() else path

        return dataclasses.replace(self, model=absolute(self.model), pretrained=absolute(self.pretrained),
                                   tokenizer=absolute(self.tokenizer))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ModelSpec":
        """The spec an embed.json recorded (folders embedded before --precision recorded "quantize")."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise DataError(f"{where}: 'model' does not say how to load the model; pass --model")
        precision = data.get("precision") or ("int8" if data.get("quantize") == "int8" else "fp32")
        fields = {f.name for f in dataclasses.fields(cls)} - {"precision"}
        return cls(precision=precision, **{k: data[k] for k in fields if k in data})

    @property
    def random_weights(self) -> bool:
        """A preset without pretrained weights: its results mean nothing."""
        return not Path(self.model).exists() and not self.pretrained

    def served_name(self) -> str:
        """The model's id where it is served: the folder's name (RUN/model: the run's)."""
        path = Path(self.model)
        return path.parent.name if path.name == "model" and path.parent.name else path.name

    def device(self, requested: str | None = None) -> str:
        """Where it runs for `requested` (None or auto: see `precision.inference_device`)."""
        onnx = self.runtime == "onnx" or is_onnx_export(self.model)
        return inference_device(requested, self.precision, onnx, int(os.environ.get("LOCAL_RANK", 0)))

    def load(self, device: str | None = None):
        """The model (a CLIP, or an OnnxCLIP for an export folder), in eval mode."""
        return load(self.model, pretrained=self.pretrained, quick_gelu=self.quick_gelu, precision=self.precision,
                    runtime=self.runtime, device=self.device(device), tokenizer=self.tokenizer)
