"""Model directories (config.json + model.safetensors) and safe weight reading.

Nothing here unpickles arbitrary objects: torch files are read with `weights_only=True` and
must hold a dict of tensors; safetensors files cannot hold anything else.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError, first_line
from .io import atomic_path

if TYPE_CHECKING:  # this module reads and writes files; building models is clipper.factory's job
    from .model import CLIP

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A transformers text tower's config and tokenizer, copied from its local folder into the model's
# (the weights are in model.safetensors): the model directory is whole wherever it goes.
ENCODER_DIR = "text_encoder"
_ENCODER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
# Wrappers that training code adds in front of parameter names (DDP, torch.compile).
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors, .pt, .pth or .bin file.

    Accepts a bare state dict or one under a `state_dict` key (open_clip training checkpoints),
    and drops `module.` / `_orig_mod.` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return _strip_prefixes(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # torch names the blocked global; anything else is a damaged file
            raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or not a torch file)") from None
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects other than tensors, and clipper never "
            "unpickles code (torch.load weights_only=True). Re-save it as a plain state dict or safetensors."
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__ if obj else 'nothing'}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return _strip_prefixes(obj)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out



def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load `sd` into `model` (built on any device, meta included), requiring an exact match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{source}: weights do not fit the model config: {'; '.join(parts)}")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {list(value.shape)}, the config wants "
                                  f"{list(expected[key].shape)}")
    # assign=True adopts the loaded tensors, so a model built on the meta device costs no init.
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=True)


def save_model(model: CLIP, path: str | os.PathLike) -> Path:
    """Write `path`/config.json and `path`/model.safetensors; each file is replaced atomically,
    weights first, so an interrupted save leaves the previous model readable."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        # one metadata key: safetensors writes them in hash order, which changes the bytes from run to run
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = bundle_text_encoder(model.config, path)
    if model.decoder is not None:  # its files beside the weights (a language model's tokenizer)
        config = dataclasses.replace(config, decoder=model.decoder.bundle(path))
    with atomic_path(path / CONFIG_NAME) as tmp:
        config.to_json(tmp)
    return path


def bundle_text_encoder(config: ModelConfig, path: Path) -> ModelConfig:
    """The config to write: a text tower built from a local transformers folder gets that folder's
    config and tokenizer files copied to `path`/ENCODER_DIR and is named by it."""
    t = config.text
    if t.kind != "hf" or not Path(t.hf_model).is_dir():
        return config
    source, target = Path(t.hf_model).resolve(), path / ENCODER_DIR
    if source != target.resolve():
        target.mkdir(exist_ok=True)
        for file in sorted(source.iterdir()):
            if file.is_file() and not file.name.endswith(_ENCODER_WEIGHTS):
                with atomic_path(target / file.name) as tmp:
                    shutil.copyfile(file, tmp)
    tokenizer = ENCODER_DIR if t.tokenizer and Path(t.tokenizer).resolve() == source else t.tokenizer
    return dataclasses.replace(config, text=dataclasses.replace(t, hf_model=ENCODER_DIR, tokenizer=tokenizer,
                                                                hf_pretrained=False))


def resolve_text_encoder(config: ModelConfig, path: Path) -> ModelConfig:
    """A text tower named by the model directory's own ENCODER_DIR, as that folder's path."""
    t = config.text
    if t.kind != "hf" or t.hf_model != ENCODER_DIR or not (path / ENCODER_DIR).is_dir():
        return config
    folder = str((path / ENCODER_DIR).resolve())
    return dataclasses.replace(config, text=dataclasses.replace(
        t, hf_model=folder, tokenizer=folder if t.tokenizer == ENCODER_DIR else t.tokenizer))


def resolve_decoder_files(config: ModelConfig, path: Path) -> ModelConfig:
    """A decoder's language model and datastore named by folders of the model directory, as those
    folders' paths."""
    d = config.decoder
    if d is None:
        return config
    found = {name: str((path / getattr(d, name)).resolve()) for name in ("language_model", "datastore")
             if getattr(d, name) and not Path(getattr(d, name)).is_absolute() and (path / getattr(d, name)).is_dir()}
    return dataclasses.replace(config, decoder=dataclasses.replace(d, **found)) if found else config


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_model_dir(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(config, weights, weights file name) of a model directory written by `save_model`."""
    path = Path(path)
    if not is_model_dir(path):
        raise CheckpointError(f"{path}: not a clipper model directory (no {CONFIG_NAME})")
    config = resolve_decoder_files(resolve_text_encoder(ModelConfig.from_json(path / CONFIG_NAME), path), path)
    return config, read_state_dict(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME)
