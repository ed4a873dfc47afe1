"""A vision-language model (LLaVA's and Idefics3's shape): an image tower whose chosen layers'
tokens (normalised, pixel-shuffled where the folder says) a projector maps into a pretrained
language model's embedding, in place of the prompt's image tokens.

`VLM` is the `Captioner` clipper's generation engine drives (clipper.generate: greedy, beams,
sampling, penalties, streaming): `prefill` runs the prompt with its images once into the language
model's KV cache, `decode` feeds one token per row, `full_logits` recomputes (the reference).
`chat` and `caption` are the user's verbs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError
from ..generate import GenerationConfig, generate_ids
from ..images import open_image
from ..model.decoders.base import Captioner, Codec
from ..model.decoders.spliced import LMCache, SplicedCaptioner
from ..model.vision import VisionTransformer
from ..model.decoders.language import LanguageModel
from ..model.decoders.chat import user_message
from ..model.decoders.datastore import retrieval_prompt
from .processor import ChatProcessor
from ..model.decoders.projector import pixel_shuffle


@dataclass
class VLMConfig:
    """How the image reaches the language model, and how answers end (from the folder)."""
    kind: str  # the folder's model_type
    feature_layers: list[int]  # the tower's hidden states read (concatenated), transformers' indexing
    select: str  # default: the class token dropped; full: every token
    image_token_id: int
    end_ids: tuple[int, ...]  # generation_config's eos_token_id(s)
    post_norm: bool = False  # the tower's final LayerNorm on the features (Idefics3)
    shuffle: int = 1  # pixel shuffle: each shuffle x shuffle block of tokens in one (Idefics3's scale_factor)
    default_prompt: str = "Describe this image."
    # generation_config.json's settings that GenerationConfig has (as transformers' generate, they
    # apply where the call does not say otherwise)
    generation: dict = field(default_factory=dict)

    def options(self, asked: dict) -> GenerationConfig:
        return GenerationConfig(**{"max_new_tokens": 256, **self.generation, **asked}).validate()


class ChatCodec(Codec):
    """The language model's ids the engine reads: its vocabulary and the folder's end tokens."""

    def __init__(self, vocab_size: int, end_ids: Sequence[int]):
        self.vocab_size, self.end_id, self.stop_ids = vocab_size, end_ids[0], tuple(end_ids)

    @property
    def end_ids(self) -> tuple[int, ...]:
        return self.stop_ids


class VLM(SplicedCaptioner, nn.Module):
    def __init__(self, config: VLMConfig, vision: VisionTransformer, projector: nn.Module, language: LanguageModel,
                 processor: ChatProcessor):
        super().__init__()
        self.config, self.vision, self.projector, self.language = config, vision, projector, language
        self.processor = processor
        self.image_token_id = config.image_token_id
        self.codec = ChatCodec(language.vocab_size, config.end_ids)
        self.context_length = language.context_length
        self.precision = "fp32"  # int8: a quantised copy (clipper.quantize.with_precision)
        # pixels -> the captions to put before a question about each image (a retrieving decoder's)
        self.retriever: Callable[[torch.Tensor], list[list[str]]] | None = None

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        # bf16 is the weights themselves (`resolve_precision` allows it where the CPU has it natively):
        # autocast would cast every weight again at every decode step, measured 2x slower
        # (benchmarks/README.md, "Vision-language models")
        self._precision = value
        if value == "bf16":
            self.to(torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- the image -----------------------------------------------------------------------------
    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed frames [N, 3, H, W] -> what the projector reads [N, tokens, width x layers]:
        the chosen layers' tokens (normalised where the folder says), concatenated."""
        states = self.vision.hidden_states(pixels.to(self.device), self.config.feature_layers)
        if self.config.select == "default":  # the class token dropped
            states = [s[:, 1:] for s in states]
        if self.config.post_norm:
            states = [self.vision.ln_post(s) for s in states]
        return torch.cat(states, dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`tower_features` -> the language model's inputs [N, tokens / shuffle^2, D]."""
        return self.projector(pixel_shuffle(features, self.config.shuffle))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed frames [N, 3, H, W] -> the language model's inputs for them [N, tokens, D]."""
        return self.project(self.tower_features(pixels))

    def features_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One row per image of its frames' features in order [N, tokens, D], zero-padded after a
        row whose image has fewer frames (Idefics3's tiles vary with the aspect ratio)."""
        rows = [self.image_features(self.processor.pixels([im])).flatten(0, 1) for im in images]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def retrieving(self, messages: list[dict], images: Sequence[Image.Image]) -> list[dict]:
        """`messages` (content lists), where the model retrieves captions (`retriever`: pixels ->
        captions per image), with those nearest to the image before the text of the user turn that
        shows it, as the model was trained to read them."""
        if self.retriever is None or not images:
            return messages
        captions = self.retriever(self.processor.pixels(images[:1]))[0]
        out = list(messages)
        for i, message in enumerate(out):
            parts = message["content"]
            if message["role"] == "user" and not isinstance(parts, str) and any(p["type"] == "image" for p in parts):
                texts = [j for j, p in enumerate(parts) if p["type"] == "text"]
                parts = list(parts) if texts else [*parts, {"type": "text", "text": ""}]
                j = texts[0] if texts else len(parts) - 1
                parts[j] = {"type": "text", "text": retrieval_prompt(parts[j]["text"], captions)}
                out[i] = {**message, "content": parts}
                break
        return out

    # --- the verbs -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], cfg: GenerationConfig,
                 stream: Callable[[torch.Tensor], None] | None = None) -> list[list[list[int]]]:
        """New ids [row][sequence] for one user turn per row: prompts[i] about images[i]."""
        if len(images) != len(prompts):
            raise ConfigError(f"prompts: {len(prompts)} for {len(images)} image(s)")
        processor = self.processor
        rows = [processor.encode(processor.render(self.retrieving([user_message(p)], [im])), processor.image_texts([im]))
                for im, p in zip(images, prompts)]
        return generate_ids(self, self.features_of(images), rows, cfg, stream)

    @torch.inference_mode()
    def respond(self, images: Sequence[Image.Image], row: list[int], cfg: GenerationConfig,
                stream: Callable[[str], None] | None = None, features: torch.Tensor | None = None,
                captioner: "Captioner | None" = None, stop: Sequence[str] = ()) -> list[int]:
        """The new ids after one prompt `row` (rendered and encoded, its image tokens expanded) about
        `images` (0 or more, in order; or their `features`, computed before). `stream`: called
        with each new piece of text; `captioner`: what the engine drives in place of the VLM itself;
        `stop`: strings that end the answer (greedy and sampling stop generating at one; the text
        streamed never holds one: `cut_at_stop` cuts the whole answer's text)."""
        if features is None:
            features = self.image_features(self.processor.pixels(images)) if images else \
                torch.zeros(1, 0, self.language.config.hidden_size, device=self.device)
        pieces = _TextStream(self.processor, stream, stop) if stream is not None or stop else None
        return generate_ids(captioner or self, features.reshape(1, -1, features.shape[-1]), [row], cfg,
                            pieces)[0][0]

    def conversation(self, image: Image.Image | str | os.PathLike) -> "Conversation":
        """A chat about `image`: its features are computed once, for every turn."""
        return Conversation(self, image if isinstance(image, Image.Image) else open_image(image))

    def chat(self, image: Image.Image | str | os.PathLike, prompt: str, stream: Callable[[str], None] | None = None,
             **options) -> str:
        """The answer to `prompt` about `image` (options: GenerationConfig's fields, named as in
        transformers: max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_k,
        top_p, repetition_penalty, seed; and stop_strings, the answer ending before the first
        one). `stream`: called with each new piece of text."""
        return self.conversation(image).ask(prompt, stream, **options)["text"]

    def caption(self, images, prompt: str | None = None, **options) -> list[str]:
        """One answer per image to `prompt` (default: the model's captioning prompt)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        return [self.chat(im, prompt or self.config.default_prompt, **options) for im in images]


class _Continuing:
    """The VLM as the engine's Captioner, its prefill continuing a kept cache: the ids the cache
    holds that start the new row are not run again (a chat's earlier turns, its image), the rest
    are run on top of them. The cache it ends with is kept (`cache`) for the next turn."""

    def __init__(self, vlm: VLM, kept: LMCache | None, kept_ids: list[int]):
        self.vlm, self.kept, self.kept_ids = vlm, kept, kept_ids
        self.codec, self.context_length = vlm.codec, vlm.context_length
        self.decode, self.full_logits = vlm.decode, vlm.full_logits
        self.cache: LMCache | None = None
        self.reused = 0

    def prefill(self, image_tokens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                room: int) -> tuple[torch.Tensor, LMCache]:
        row = tokens[0].tolist()
        same = 0
        if self.kept is not None and tokens.shape[0] == 1:
            limit = min(len(self.kept_ids), len(row) - 1)  # at least one token runs, for the next logits
            while same < limit and self.kept_ids[same] == row[same]:
                same += 1
        if same == 0 or self.vlm.config.image_token_id in row[same:]:
            logits, self.cache = self.vlm.prefill(image_tokens, tokens, valid, room)
            return logits, self.cache
        kv = self.kept.kv
        if self.kept.length > same:
            kv.crop(same - self.kept.length)  # negative: that many dropped from the end (any transformers)
        rest = tokens[:, same:]
        positions = torch.arange(same, len(row), device=tokens.device)[None]
        logits = self.vlm.language(self.vlm.language.embed(rest), valid, positions, kv)[:, -1]
        self.reused = same
        self.cache = LMCache(valid=valid, positions=torch.tensor([len(row)], device=tokens.device), length=len(row),
                             padded=False, kv=kv)
        return logits, self.cache


class Conversation:
    """Turns of a chat about one image: the user's prompts and the model's answers, rendered with
    the chat template each turn. The image's features are computed once, and the language model's
    cache is kept from turn to turn: a turn runs only the tokens its prompt adds (`reused`: the
    cached ones the last turn did not run again)."""

    def __init__(self, vlm: VLM, image: Image.Image):
        self.vlm, self.messages, self.image = vlm, [], image
        self.image_texts = vlm.processor.image_texts([image])
        with torch.inference_mode():
            self.features = vlm.image_features(vlm.processor.pixels([image]))
        self.kept: LMCache | None = None
        self.kept_ids: list[int] = []
        self.reused = 0

    def ask(self, prompt: str, stream: Callable[[str], None] | None = None, **options) -> dict:
        """The answer {"text", "tokens", "seconds"} to the next user turn (options: as `VLM.chat`)."""
        stop = stop_strings(options.pop("stop_strings", None))
        cfg = self.vlm.config.options(options)
        processor = self.vlm.processor
        t0 = time.perf_counter()
        messages = [*self.messages, user_message(prompt, images=0 if self.messages else 1)]
        if not self.messages:  # (later turns keep the first one's retrieved captions)
            messages = self.vlm.retrieving(messages, [self.image])
        row = processor.encode(processor.render(messages), self.image_texts)
        # a kept cache is one row that greedy or sampled decoding grew (beams reorder and drop rows)
        reusable = cfg.use_cache and cfg.num_beams == 1 and cfg.num_return_sequences == 1
        captioner = _Continuing(self.vlm, self.kept if reusable else None, self.kept_ids)
        ids = self.vlm.respond([], row, cfg, stream, self.features, captioner, stop)
        self.reused = captioner.reused
        self.kept = captioner.cache if reusable else None
        self.kept_ids = (row + ids)[:self.kept.length] if self.kept is not None else []
        text = cut_at_stop(processor.decode(ids), stop)[0]
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        return {"text": text, "tokens": ids, "seconds": round(time.perf_counter() - t0, 3)}


def stop_strings(value) -> tuple[str, ...]:
    """A stop option (a string, or a list of up to 8 non-empty strings of at most 100 characters)
    as a tuple; none: ()."""
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, (list, tuple)) or len(stops) > 8 or \
            not all(isinstance(x, str) and 0 < len(x) <= 100 for x in stops):
        raise ConfigError("stop: a string or a list of up to 8 non-empty strings of at most 100 characters")
    return tuple(stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(`text` up to the first of `stops`, whether one was found)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


class _TextStream:
    """Token ids -> the text they add, as it becomes whole (a character may span tokens), never
    a stop string: the text that could begin one is held back until it cannot. Returns True (the
    engine stops) once the text holds one."""

    def __init__(self, processor: ChatProcessor, emit: Callable[[str], None] | None, stops: Sequence[str] = ()):
        self.processor, self.emit, self.stops, self.ids, self.sent = processor, emit, tuple(stops), [], ""

    def __call__(self, token: torch.Tensor) -> bool:
        self.ids.append(int(token[0]))
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next token
            return False
        text, stopped = cut_at_stop(text, self.stops)
        if not stopped:  # hold back a tail that starts a stop string
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        if self.emit is not None and len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
        self.sent = max(self.sent, text, key=len)
        return stopped
