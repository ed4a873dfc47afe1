"""transformers' `llava` folders (LlavaForConditionalGeneration: a CLIP or SigLIP image tower, the
MLP projector, any causal language model transformers builds) as a clipper VLM. The image tower is
clipper's ViT (the weights renamed as for CLIPModel / SiglipModel folders); the projector is
clipper's; the language model is transformers' module with the folder's weights. Sharded
safetensors, the older layout's names (language_model.model.*, vision_tower.* at the top) and
generation_config.json's list of end tokens are read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import io
from ..errors import CheckpointError, ConfigError
from .folder import CONFIG, folder_weights, generation_settings, image_tower, language_model
from .model import VLM, VLMConfig
from .processor import ChatProcessor, ModelImages
from ..model.decoders.projector import MLPProjector

# the older layout's prefixes -> transformers 5's
_RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
_VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _renamed(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _feature_layers(value, where: str) -> list[int]:
    layers = [value] if isinstance(value, int) else value
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        raise ConfigError(f"{where}: vision_feature_layer must be an integer or a list of them, got {value!r}")
    return layers


def load_llava(path: str | os.PathLike, native_lm: bool = True) -> VLM:
    """The folder as a VLM; `native_lm` False: the language model in transformers' module even
    where clipper's own runs it (the comparison benchmarks/vlm.py makes)."""
    folder = Path(path)
    where = str(folder / CONFIG)
    hf = io.read_json_object(folder / CONFIG, "transformers model config", {"vision_config": dict, "text_config": dict})
    vc, tc = hf["vision_config"], hf["text_config"]
    kind = _VISION_KINDS.get(vc.get("model_type", "clip_vision_model"))
    if kind is None:
        raise ConfigError(f"{where}: vision_config.model_type {vc.get('model_type')!r}: clipper runs "
                          f"{', '.join(_VISION_KINDS)} towers in a LLaVA")
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {select!r}: default or full")
    layers = _feature_layers(hf.get("vision_feature_layer", -2), f"{where}")
    image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
    if not isinstance(image_token_id, int):
        raise ConfigError(f"{where}: no image_token_id")

    sd = {_renamed(k): v for k, v in folder_weights(folder).items()}
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "language": {}}
    for key, value in sd.items():
        if key.startswith("model.vision_tower."):  # the CLIPVisionModel's names, with or without vision_model.
            name = key[len("model.vision_tower."):]
            parts["vision"][name if name.startswith("vision_model.") else "vision_model." + name] = value
        elif key.startswith("model.multi_modal_projector."):
            parts["projector"][key[len("model.multi_modal_projector."):]] = value
        elif key.startswith("model.language_model."):
            parts["language"]["model." + key[len("model.language_model."):]] = value
        elif key == "lm_head.weight":
            parts["language"][key] = value
        else:
            raise CheckpointError(f"{folder}: tensor {key} has no place in a LLaVA model")

    vision = image_tower(vc, kind, parts["vision"], folder, f"{where}: vision_config")
    projector = MLPProjector(vision.cfg.width * len(layers), int(tc.get("hidden_size", 0)),
                             hf.get("projector_hidden_act", "gelu"), bool(hf.get("multimodal_projector_bias", True)))
    try:
        projector.load_state_dict(parts["projector"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: the projector's weights do not fit ({str(e).splitlines()[0]})") from None
    language = language_model(tc, parts["language"], folder, where, bool(hf.get("tie_word_embeddings")), native_lm)

    # transformers' count: every token of the tower, less the first with the default strategy
    # (dropped as a class token even where the tower, SigLIP, has none)
    tokens = vision.cfg.grid ** 2 + int(vision.cfg.class_token) - int(select == "default")
    processor = ChatProcessor.from_folder(folder, tokens)
    if processor.image_token_id != image_token_id:
        raise ConfigError(f"{folder}: the tokenizer's image token {processor.image_token!r} is id "
                          f"{processor.image_token_id}, the config says {image_token_id}")
    end_ids, generation = generation_settings(folder, tc)
    config = VLMConfig(kind="llava", feature_layers=layers, select=select, image_token_id=image_token_id,
                       end_ids=end_ids, generation=generation)
    return VLM(config, vision, projector, language, processor).eval()


def llava_of_model(model) -> VLM:
    """A clipper model with a llava decoder as a VLM (chat, conversations), sharing its modules: its
    ViT, projector and language model, the model's own preprocessing; a decoder that retrieves
    captions retrieves them for its chats too (from its datastore as it is at each chat)."""
    decoder = model.decoder
    cfg = decoder.cfg
    config = VLMConfig(kind="llava", feature_layers=[cfg.feature_layer], select=cfg.select,
                       image_token_id=decoder.image_token_id, end_ids=decoder.codec.end_ids, shuffle=cfg.shuffle,
                       default_prompt=cfg.prompt)
    p = decoder.processor
    processor = ChatProcessor(p.folder, p.tokenizer, p.template, p.text, ModelImages(model.preprocessing))
    vlm = VLM(config, model.visual, decoder.projector, decoder.language, processor)
    if cfg.retrieve:
        vlm.retriever = lambda pixels: decoder.retrieved(model, pixels)
    return vlm.eval()
