"""Training objectives: what a run optimises.

Each objective owns everything that differs between them: how the model is set up (random, or
loaded from `init`, with what added), which parts are trained, the module the trainer runs (and
DDP wraps), the caption length the data is tokenized to, and forward + loss + backward of one
batch in micro-batches. The trainer runs one and never asks which (`OBJECTIVES[cfg.objective]`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import is_model_dir
from .config import ModelConfig
from .model.hf_text import pretrained_text_config
from .presets import preset
from .retrieval import build_datastore, caption_neighbours
from .train_config import TrainConfig
from .data.reader import shard_captions
from .errors import ConfigError
from .factory import load
from .feature_store import FeatureStore, evaluated, fingerprint
from .feature_style import add_feature_style
from .losses import LOSSES, view_loss
from .model import CLIP
from .model.decoders import DECODERS
from .tokenizer import caption_vocabulary
from .view_mix import swap_view_patches

Autocast = Callable[[], contextlib.AbstractContextManager]


def _no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces gradients once, after the last micro-batch of a step."""
    return module.no_sync() if not last and hasattr(module, "no_sync") else contextlib.nullcontext()


def _decoder(module: nn.Module) -> nn.Module:
    """The caption decoder inside a CaptionModel, whether DDP wraps it or not."""
    return getattr(module, "module", module).model.decoder


def _set_trainable(parts: dict[nn.Module | nn.Parameter | None, bool]) -> None:
    """requires_grad per part; a frozen part gets no gradient and no optimizer state."""
    for part, trainable in parts.items():
        if part is not None:
            part.requires_grad_(trainable)


def _projection(tower: nn.Module) -> nn.Module | nn.Parameter | None:
    """The map from a tower's features to the shared embedding (ViT/text `proj`, timm `head`)."""
    for name in ("proj", "head"):
        part = getattr(tower, name, None)
        if isinstance(part, (nn.Module, nn.Parameter)):
            return part
    return None


def _init_model(cfg: TrainConfig) -> CLIP:
    """The weights of `init` (a clipper model directory, or an open_clip file of `cfg.model`)."""
    return load(cfg.init) if is_model_dir(cfg.init) else load(cfg.model, pretrained=cfg.init)


class Objective(abc.ABC):
    """The interface the trainer uses; see the module docstring."""
    name: ClassVar[str]

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.features: FeatureStore | None = None  # a frozen tower's cached features, where the module keeps them

    def finish(self, model: CLIP) -> None:
        """What the trained model needs before it is saved (nothing, unless the objective says)."""

    @staticmethod
    def validate(cfg: TrainConfig) -> None:
        """Settings this objective needs beyond TrainConfig.validate (ConfigError otherwise)."""

    @abc.abstractmethod
    def build_model(self) -> CLIP:
        """The model to train, its trainable parts set (in train mode)."""

    @abc.abstractmethod
    def caption_tokenizer(self, model: CLIP) -> Callable[[list[str]], torch.Tensor] | None:
        """What captions are tokenized by (a decoder's rows), or None: the text tower's own
        tokenizer (BPE, or the Hugging Face one its config names)."""

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The weights of --init, as the run started from them (for WiSE-FT's mix at the end)."""
        return _init_model(self.cfg).state_dict()

    def deferred(self, model: CLIP) -> list[nn.Module]:
        """The locked parts that start training at `unlock_step` (the optimizer holds them from the
        start, so that unlocking changes no parameter group)."""
        return []

    def module(self, model: CLIP) -> nn.Module:
        """What the trainer runs (and DDP wraps): forward(images, tokens) -> what `forward_backward` needs."""
        return model

    @abc.abstractmethod
    def forward_backward(self, module: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                         autocast: Autocast = contextlib.nullcontext,
                         groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss and gradients of one batch; the losses to log ("loss" first). `groups`: the
        batch's view-group ids (TrainConfig.view_key), or None."""


class Contrastive(Objective):
    """Both towers against each other with InfoNCE or the sigmoid loss; a decoder is left alone."""
    name = "contrastive"

    @staticmethod
    def validate(cfg: TrainConfig) -> None:
        if cfg.init_text and cfg.init:
            raise ConfigError("train.init_text: starts a new model's text tower; --init names a whole model already")
        if cfg.instructions:
            raise ConfigError("train.instructions: for the caption objective with a llava decoder")
        if cfg.feature_cache and (not cfg.lock_image or cfg.unlock_step is not None or cfg.train_locked_proj
                                  or cfg.feature_style):
            raise ConfigError("train.feature_cache: keeps a frozen image tower's features; needs lock_image for the "
                              "whole run, without train_locked_proj or feature_style (they change its features)")

    def build_model(self) -> CLIP:
        cfg = self.cfg
        if cfg.init:
            model = _init_model(cfg)
            if cfg.loss == "sigmoid" and model.logit_bias is None:
                raise ConfigError(f"train.init: {cfg.init} has no logit bias, which the sigmoid loss needs")
        else:  # a preset name, or a ModelConfig JSON file (a custom architecture without code)
            config = ModelConfig.from_json(cfg.model) if cfg.model.endswith(".json") else preset(cfg.model)
            if cfg.init_text:  # a pretrained encoder (all-MiniLM-L6-v2, ...) as the text tower
                config.text = pretrained_text_config(cfg.init_text, config.text.context_length, cfg.init_text_proj)
                config.validate()
            if cfg.loss == "sigmoid" and config.init_logit_bias is None:
                config.init_logit_bias, config.init_logit_scale = -10.0, math.log(10.0)  # SigLIP's init
            model = CLIP(config)
        _set_trainable({model.visual: not cfg.lock_image, model.text: not cfg.lock_text, model.decoder: False,
                        model.logit_scale: True, model.logit_bias: True})
        if cfg.train_locked_proj:
            for tower in self._locked(model):
                if (proj := _projection(tower)) is None:
                    raise ConfigError(f"train.train_locked_proj: the locked {type(tower).__name__} has no separate "
                                      "projection to the embedding")
                proj.requires_grad_(True)
        if cfg.lock_text and cfg.unlock_step is None and hasattr(model.text, "feature_cache"):
            # a locked pretrained encoder runs once per caption
            model.text.feature_cache = FeatureStore("text", max_bytes=256 << 20)
        if cfg.feature_style:
            add_feature_style(model.visual, cfg.feature_style)
        return model.train()

    def module(self, model: CLIP) -> nn.Module:
        if not self.cfg.feature_cache:
            return model
        module = LockedImageModel(model)  # LiT on a frozen tower: its embedding of each image view once
        module.features = self.features = _feature_store(module.frozen_features, model, self.cfg)
        return module

    def _locked(self, model: CLIP) -> list[nn.Module]:
        return [tower for tower, locked in ((model.visual, self.cfg.lock_image), (model.text, self.cfg.lock_text))
                if locked]

    def deferred(self, model: CLIP) -> list[nn.Module]:
        return self._locked(model) if self.cfg.unlock_step is not None else []

    def caption_tokenizer(self, model: CLIP) -> None:
        return None  # the text tower's tokenizer (an HF tower reads its own ids, not BPE)

    def forward_backward(self, module: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                         autocast: Autocast = contextlib.nullcontext,
                         groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.view_swap and groups is not None:
            images = swap_view_patches(images, groups, cfg.view_swap)
        return contrastive_forward_backward(module, images, texts, LOSSES[cfg.loss], cfg.accum_freq, autocast,
                                            cfg.same_caption_positive, groups, cfg.view_weight)


def _features_loss(loss_fn, out: dict, image: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor | None,
                   groups: torch.Tensor | None = None, view_weight: float = 0.0) -> dict[str, torch.Tensor]:
    bias = out["logit_bias"]
    scale = out["logit_scale"].float()
    losses = loss_fn(image.float(), text.float(), scale, None if bias is None else bias.float(),
                     tokens=tokens, groups=groups)
    if view_weight and groups is not None:
        views = view_loss(image.float(), scale, groups)
        losses = {**losses, "loss": losses["loss"] + view_weight * views, "view_loss": views.detach()}
    return losses


def contrastive_forward_backward(model: nn.Module, images: torch.Tensor, texts: torch.Tensor, loss_fn,
                                 accum_freq: int = 1, autocast: Autocast = contextlib.nullcontext,
                                 same_caption_positive: bool = False, groups: torch.Tensor | None = None,
                                 view_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Loss and gradients of one batch (`model` may be DDP-wrapped); with `same_caption_positive`,
    pairs with identical captions count as positives; with `groups`, pairs of one group too, and
    `view_weight` adds the image-image loss between the views of each group.

    With accum_freq k > 1 (open_clip's --accum-freq): the features of the k micro-batches are
    computed without gradients first; then each micro-batch is recomputed with gradients and scored
    against all the cached others, so every negative of the full batch counts and the summed
    gradients equal those of the whole batch at once.
    """
    tokens = texts if same_caption_positive else None
    if accum_freq == 1:
        with autocast():
            out = model(images, texts)
            losses = _features_loss(loss_fn, out, out["image_features"], out["text_features"], tokens, groups,
                                    view_weight)
        losses["loss"].backward()
        return losses
    img_chunks, txt_chunks = images.chunk(accum_freq), texts.chunk(accum_freq)
    with torch.no_grad(), autocast():
        cached = [model(i, t) for i, t in zip(img_chunks, txt_chunks)]
    for j in range(accum_freq):
        with _no_sync(model, j == accum_freq - 1):
            with autocast():
                out = model(img_chunks[j], txt_chunks[j])
                feats = {name: torch.cat([c[name] for c in cached[:j]] + [out[name]] + [c[name] for c in cached[j + 1:]])
                         for name in ("image_features", "text_features")}
                if j < accum_freq - 1:  # the temperature (and bias) get their gradient once, not k times
                    out = {**out, **{k: None if v is None else v.detach() for k, v in out.items() if k.startswith("logit")}}
                losses = _features_loss(loss_fn, out, feats["image_features"], feats["text_features"], tokens,
                                        groups, view_weight)
            losses["loss"].backward()
    return losses


def _feature_store(compute: Callable[[torch.Tensor], torch.Tensor], model: CLIP, cfg: TrainConfig) -> FeatureStore:
    """`cfg.feature_cache`'s store of what `compute` makes of an image, named by a fingerprint of it
    (this tower, what is read of it) and the precision."""
    vision = model.config.vision
    shape = (vision.in_channels, vision.image_size, vision.image_size)
    namespace = f"{fingerprint(compute, shape, model.device)}-{cfg.precision}"
    return FeatureStore(namespace, None if cfg.feature_cache == "memory" else cfg.feature_cache)


class LockedImageModel(nn.Module):
    """A CLIP as LiT trains it with its frozen image tower's embeddings from `features` (a
    FeatureStore): forward gives what CLIP.forward gives."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model
        self.features: FeatureStore | None = None

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        return evaluated(self.model.visual, lambda x: self.model.encode_image(x, normalize=True), images)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        model = self.model
        return {"image_features": self.features(images, self.frozen_features),
                "text_features": model.encode_text(tokens, normalize=True),
                "logit_scale": model.scale(), "logit_bias": model.logit_bias}


def _set_lora(model: CLIP, rank: int) -> None:
    model.decoder.set_lora(rank)
    model.config.decoder = dataclasses.replace(model.config.decoder, lora=rank)


class CaptionModel(nn.Module):
    """A CLIP as the caption objective trains it: images and caption token rows (CLIP BPE
    [start, caption..., end, 0...]) -> the decoder's teacher-forced loss on the caption and end
    tokens. A module of its own so that DDP sees the forward. The image tower runs without
    gradients unless `train_image`; a frozen one's tokens come from `features` where given."""

    def __init__(self, model: CLIP, train_image: bool):
        super().__init__()
        self.model, self.train_image = model, train_image
        self.features: FeatureStore | None = None

    def frozen_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of the frozen tower (`evaluated`)."""
        return evaluated(self.model.visual, lambda x: self.model.decoder.image_tokens(self.model.visual, x), images)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        if self.features is not None:
            image_tokens = self.features(images, self.frozen_tokens)
        else:
            with torch.set_grad_enabled(self.train_image and torch.is_grad_enabled()):
                image_tokens = model.decoder.image_tokens(model.visual, images)
        states = model.text.states(tokens) if model.decoder.reads_text_states else None
        return model.decoder.loss(image_tokens, tokens, states)


class JointModel(CaptionModel):
    """CoCa's joint objective: one pass of each tower gives both the contrastive features and what
    the decoder reads (the image's caption tokens; for CoCa's decoder, the text's states)."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        with torch.set_grad_enabled(self.train_image and torch.is_grad_enabled()):
            image_features, image_tokens = model.visual.encode(images)
        if model.decoder.reads_text_states:
            text_features, states = model.text.encode(tokens)
        else:
            text_features, states = model.text(tokens), None
        return {"image_features": F.normalize(image_features, dim=-1),
                "text_features": F.normalize(text_features, dim=-1), "logit_scale": model.scale(),
                "logit_bias": model.logit_bias, "caption": model.decoder.loss(image_tokens, tokens, states)}


class Caption(Objective):
    """A caption decoder on the image tower of a trained model (`init`); the text tower, the
    temperature and the image tower (unless unlocked) stay as they are. With contrastive_weight > 0,
    CoCa's joint objective: contrastive loss (cfg.loss) x contrastive_weight + caption loss x
    caption_weight, every tower training unless locked."""
    name = "caption"

    @staticmethod
    def validate(cfg: TrainConfig) -> None:
        if not cfg.init:
            raise ConfigError("train.init: the caption objective trains on a model's image tower; name the model")
        if cfg.init_text:
            raise ConfigError("train.init_text: for the contrastive objective (a captioner keeps --init's towers)")
        if cfg.unlock_step is not None or cfg.train_locked_proj:
            raise ConfigError("train: unlock_step and train_locked_proj are for the contrastive objective")
        if cfg.contrastive_weight > 0 and cfg.accum_freq > 1:
            raise ConfigError("train: contrastive_weight > 0 (the joint objective) needs accum_freq 1")
        if cfg.language_lora < 0 or (cfg.language_lora and not cfg.train_language_model):
            raise ConfigError(f"train.language_lora {cfg.language_lora}: a rank > 0 of adapters for "
                              "train_language_model (0: the language model's weights train)")
        if cfg.feature_cache and (not cfg.lock_image or cfg.contrastive_weight > 0):
            raise ConfigError("train.feature_cache: keeps a frozen image tower's features; needs lock_image and no "
                              "contrastive_weight")
        if cfg.contrastive_weight > 0 and cfg.decoder.kind == "llava":
            raise ConfigError("train: contrastive_weight > 0 (CoCa's joint objective) is not for a llava decoder")

    @property
    def joint(self) -> bool:
        return self.cfg.contrastive_weight > 0

    def build_model(self) -> CLIP:
        cfg = self.cfg
        model = _init_model(cfg)
        if model.decoder is None:  # a BPE head's vocabulary: the training captions' tokens, unless configured
            vocab = cfg.decoder.vocab
            if not vocab and DECODERS[cfg.decoder.kind].bpe_vocabulary:
                vocab = caption_vocabulary(shard_captions(cfg.train_data), cfg.decoder.context_length)
            model.add_decoder(dataclasses.replace(cfg.decoder, vocab=vocab))
        if cfg.instructions and not model.decoder.reads_instructions:
            raise ConfigError(f"train.instructions: a {model.config.decoder.kind} decoder writes captions; "
                              "instruction turns are for a llava decoder")
        if model.decoder.retrieves:  # a datastore of the training captions (unless it has one), and each
            # training caption's neighbours by its image, never itself, for its rows' prompts
            decoder = model.decoder
            decoder.datastore = decoder.datastore or build_datastore(model, shard_captions(cfg.train_data))
            decoder.neighbours = caption_neighbours(model, cfg.train_data, decoder.datastore, decoder.retrieves)
        if self.joint and model.config.decoder.context_length > model.config.text.context_length:
            raise ConfigError(f"train: the joint objective encodes the captions with the text tower too: the decoder "
                              f"context ({model.config.decoder.context_length}) must fit the text tower's "
                              f"({model.config.text.context_length})")
        if self.joint and cfg.loss == "sigmoid" and model.logit_bias is None:
            raise ConfigError(f"train.init: {cfg.init} has no logit bias, which the sigmoid loss needs")
        _set_trainable({model.visual: not cfg.lock_image, model.text: self.joint and not cfg.lock_text,
                        model.decoder: True, model.logit_scale: self.joint, model.logit_bias: self.joint,
                        **{part: cfg.train_language_model for part in model.decoder.pretrained_parts()}})
        if cfg.language_lora:  # (the model's config says so: a checkpoint holds the adapters)
            if not model.decoder.pretrained_parts():
                raise ConfigError(f"train.language_lora: adapters for a pretrained language model; a "
                                  f"{model.config.decoder.kind} decoder has none")
            _set_lora(model, cfg.language_lora)
        return model.train()

    def finish(self, model: CLIP) -> None:
        """LoRA adapters merged into the language model's weights (a saved model is a plain one)."""
        if self.cfg.language_lora:
            _set_lora(model, 0)

    def caption_tokenizer(self, model: CLIP) -> Callable[[list[str]], torch.Tensor]:
        return model.decoder.training_tokenizer()

    def module(self, model: CLIP) -> nn.Module:
        if self.joint:
            return JointModel(model, train_image=not self.cfg.lock_image)
        module = CaptionModel(model, train_image=not self.cfg.lock_image)
        if self.cfg.feature_cache:
            module.features = self.features = _feature_store(module.frozen_tokens, model, self.cfg)
        return module

    def forward_backward(self, module: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                         autocast: Autocast = contextlib.nullcontext,
                         groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """In `accum_freq` micro-batches weighted by their caption tokens (the sum equals the whole
        batch's token-mean loss); the joint objective in one."""
        cfg = self.cfg
        if self.joint:
            with autocast():
                out = module(images, texts)
                contrastive = _features_loss(LOSSES[cfg.loss], out, out["image_features"], out["text_features"],
                                             texts if cfg.same_caption_positive else None, groups,
                                             cfg.view_weight)["loss"]
                caption = out["caption"]["loss"]
                loss = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
            loss.backward()
            return {"loss": loss.detach(), "contrastive_loss": contrastive.detach(), "caption_loss": caption.detach()}
        k = cfg.accum_freq
        counts = _decoder(module).target_counts(texts)  # predicted tokens per row: the caption and its end
        total = float(counts.sum())
        loss = torch.zeros(())
        for j, (i_chunk, t_chunk, e_chunk) in enumerate(zip(images.chunk(k), texts.chunk(k), counts.chunk(k))):
            with _no_sync(module, j == k - 1):
                with autocast():
                    part = module(i_chunk, t_chunk)["loss"]
                part = part * (cfg.caption_weight * float(e_chunk.sum()) / total)
                part.backward()
            loss += part.detach().float().cpu()
        return {"loss": loss}


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Contrastive, Caption)}
