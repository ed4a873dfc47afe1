"""`clipper.load`: one entry point for model directories, open_clip files, presets and open_clip
pretrained tags."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import is_model_dir, read_model_dir, read_state_dict
from .config import ModelConfig
from .presets import apply_open_clip_preprocessing, preset
from .errors import CheckpointError, ConfigError
from .interop.hf import hf_kind, load_hf_dir
from .io import reachable
from .interop.open_clip import from_open_clip_state_dict, is_open_clip_state_dict, load_open_clip_checkpoint
from .model import CLIP
from .interop.onnx_model import is_onnx_export
from .interop.open_clip_dir import is_open_clip_dir, load_open_clip_dir
from .precision import resolve_precision
from .quantize import with_precision
from .vlm import VLM, load_vlm, vlm_kind


def load_model(path: str | os.PathLike) -> CLIP:
    """A model directory written by `CLIP.save` (config.json + model.safetensors)."""
    config, sd, source = read_model_dir(path)
    return CLIP.from_state_dict(config, sd, source)


def load(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None,
         quick_gelu: bool | None = None, device: str | torch.device = "cpu",
         cache_dir: str | None = None, precision: str = "fp32", runtime: str | None = None,
         tokenizer: str | os.PathLike | None = None) -> CLIP | VLM:
    """A CLIP model in eval mode, from
    - a clipper model directory (config.json + model.safetensors);
    - an open_clip local-dir folder (open_clip_config.json + open_clip_model.safetensors);
    - an open_clip checkpoint file (architecture inferred from the tensors);
    - a preset name (`fmnist-tiny`, `ViT-B-32`, ...): random weights, or `pretrained=` an
      open_clip pretrained tag (downloaded by open_clip's own code, needs a network) or a file.
    `quick_gelu` overrides the activation (OpenAI-trained weights need it; open_clip's tags say so).
    - an ONNX export folder (`clipper export --format onnx`): run by ONNX Runtime (`runtime="onnx"`);
    - a Hugging Face transformers CLIPModel or SiglipModel folder (config.json + model.safetensors);
    - a transformers vision-language model folder (LLaVA): a `clipper.vlm.VLM`, which chats.
    `precision`: fp32, bf16 (where native: refused elsewhere), int8 (CPU) or auto (`clipper.precision`).
    `runtime`: torch or onnx, checked against what the path holds (default: whichever it is).
    `tokenizer`: a Hugging Face tokenizer folder (or hub name) in place of the one the config names.
    """
    precision = resolve_precision(precision, device)  # refused before anything is read
    path = Path(name_or_path)
    if runtime not in (None, "torch", "onnx"):
        raise ConfigError(f"runtime: torch or onnx, got {runtime!r}")
    if is_onnx_export(path) != (runtime == "onnx") and runtime is not None:
        raise ConfigError(f"{path}: an ONNX export folder runs with --runtime onnx only" if runtime == "torch" else
                          f"{path}: --runtime onnx needs a folder from `clipper export --format onnx`")
    if is_onnx_export(path):
        from .interop.onnx_model import load_onnx

        if torch.device(device).type != "cpu":
            raise ConfigError(f"{path}: the ONNX runtime here runs on the CPU only, not {device}")
        return load_onnx(path, precision)
    if vlm_kind(path):
        return with_precision(load_vlm(path).to(device), precision)
    if hf_kind(path):
        model = load_hf_dir(path)
    elif is_model_dir(path):
        model = load_model(path)
    elif is_open_clip_dir(path):
        model = load_open_clip_dir(path)
    elif path.is_file():
        model = load_open_clip_checkpoint(path, quick_gelu=bool(quick_gelu))
    elif path.exists():
        raise CheckpointError(f"{path}: not a clipper model directory (no config.json), nor an open_clip "
                              "folder (no open_clip_config.json)")
    else:
        config = preset(str(name_or_path))
        if quick_gelu is not None:
            config.quick_gelu = quick_gelu
        model = CLIP(config) if pretrained is None else _load_pretrained(str(name_or_path), config, pretrained,
                                                                          quick_gelu, cache_dir)
    if tokenizer is not None:
        if not model.config.text.tokenizer:
            raise ConfigError(f"tokenizer {tokenizer}: this model's text tower reads CLIP BPE ids, not a Hugging "
                              "Face tokenizer's")
        model.config.text.tokenizer = str(tokenizer)
    return with_precision(model.to(device).eval(), precision)


def _load_pretrained(name: str, config: ModelConfig, pretrained: str | os.PathLike, quick_gelu: bool | None,
                     cache_dir: str | None) -> CLIP:
    path = Path(pretrained)
    if not path.is_file():
        path = _download_open_clip(name, str(pretrained), config, quick_gelu, cache_dir)
    sd = read_state_dict(path)
    if is_open_clip_state_dict(sd):
        return from_open_clip_state_dict(sd, config, source=str(path), copy=False)
    return CLIP.from_state_dict(config, sd, str(path))


def _download_open_clip(name: str, tag: str, config: ModelConfig, quick_gelu: bool | None,
                        cache_dir: str | None) -> Path:
    """Fetch open_clip's weights for (name, tag) with open_clip's own download code, and apply the
    tag's settings (QuickGELU, normalisation) to `config`."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"pretrained={tag!r}: not a file, and not an open_clip pretrained tag of {name} "
                          f"(tags: {', '.join(tags) or 'none'})")
    if quick_gelu is None:
        config.quick_gelu = bool(tag_cfg.get("quick_gelu", config.quick_gelu))
    apply_open_clip_preprocessing(config.vision, tag_cfg)
    host, cached = _cache_lookup(tag_cfg, cache_dir)
    if not reachable(host):  # open_clip's download would retry for about a minute
        if cached is None:
            raise CheckpointError(f"{name}/{tag}: {host} cannot be reached (offline?) and the weights are not in the "
                                  "local cache; pass pretrained=/path/to/weights")
        return cached
    try:
        target = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # network errors come in many types (OSError, HTTP, hub errors)
        raise CheckpointError(f"could not download open_clip weights {name}/{tag}: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}; "
                              "offline, pass pretrained=/path/to/weights") from None
    if not target:
        raise CheckpointError(f"open_clip has no download location for {name}/{tag}")
    return Path(target)


def _cache_lookup(tag_cfg: dict, cache_dir: str | None) -> tuple[str, Path | None]:
    """(the host open_clip downloads this tag from, the weights file already in its cache or None),
    without touching the network."""
    from urllib.parse import urlparse

    import huggingface_hub
    from open_clip.pretrained import _get_safe_alternatives

    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])  # "org/name/" names open_clip's default file
        filename = filename or "open_clip_pytorch_model.bin"
        for candidate in [*_get_safe_alternatives(filename), filename]:
            found = huggingface_hub.try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return urlparse(huggingface_hub.constants.ENDPOINT).hostname, Path(found)
        return urlparse(huggingface_hub.constants.ENDPOINT).hostname, None
    url = tag_cfg.get("url", "")
    path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return urlparse(url).hostname or "", path if path.is_file() else None
