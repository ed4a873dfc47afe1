"""Model configs: dataclasses that read and write JSON, and the named presets.

Presets are configs, not code paths: `fmnist-tiny` and `emoji-small` are ours; every ViT CLIP
config that ships with open_clip (ViT-B-32, ViT-B-16, ViT-L-14, ViT-S-32, ViT-M-32, their
-quickgelu twins, ...) is translated from open_clip's own JSON rather than retyped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import io
from .errors import ConfigError

# the activations a tower may name (clipper.model.transformer.activation builds them)
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")

# open_clip's defaults (OpenAI's dataset statistics), used unless a preset says otherwise.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    # "vit"; "resnet": OpenAI's ModifiedResNet (stages, width = stem width); "timm": a timm model
    # as the trunk (timm_model, built by timm as open_clip does) with open_clip's pooling/projection head
    kind: str = "vit"
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    in_channels: int = 3
    # "tok": class token; "avg": mean of the patch tokens; "attn": CoCa's attentional pooler, whose
    # first query gives the embedding and the others the tokens a caption decoder reads; "map":
    # SigLIP's attention-pooling head (one learned query, then a residual MLP)
    pool: str = "tok"
    attn_pool_queries: int = 256
    attn_pool_heads: int = 8
    stages: tuple[int, ...] = ()  # resnet: bottleneck blocks of its four stages, e.g. (3, 4, 6, 3)
    class_token: bool = True  # vit: a class token before the patches (SigLIP has none)
    patch_bias: bool = False  # vit: the patch embedding has a bias (SigLIP's)
    projection: bool = True  # vit: off, the pooled row is the embedding (width = embed_dim: SigLIP)
    ln_pre: bool = True  # vit: LayerNorm after the embeddings (CLIPA and SigLIP have none)
    norm_after_pool: bool = False  # vit: ln_post on the pooled row, not on every token before pooling (CLIPA)
    act: str = "gelu"  # vit: gelu, gelu_tanh or quick_gelu (the model's quick_gelu overrides it)
    norm_eps: float = 1e-5
    # timm: the model name, its global pool ("" keeps timm's default), the projection open_clip puts
    # after it ("linear", "mlp", "none": none at all, "": timm's classifier of embed_dim outputs).
    # A vit with timm_model set is that timm network in clipper's code (SigLIP's): open_clip builds it
    # with timm, and its weights carry timm's names
    timm_model: str = ""
    timm_pool: str = "avg"
    timm_proj: str = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float | None = None
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD
    # preprocessing: "shortest" side to image_size then a centre crop, or "squash" to image_size x
    # image_size (SigLIP's, MobileCLIP's); bicubic or bilinear (open_clip's pretrained configs say which)
    resize: str = "shortest"
    interpolation: str = "bicubic"

    def validate(self, where: str = "vision") -> None:
        _positive(self, where, ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "in_channels",
                                "norm_eps"))
        _at_most(self, where, image_size=16384, patch_size=1024, width=16384, layers=1024, heads=1024, mlp_ratio=64,
                 in_channels=64)
        if self.kind == "resnet":
            if len(self.stages) != 4 or min(self.stages) < 1 or max(self.stages) > 1024:
                raise ConfigError(f"{where}.stages: a resnet needs four stages of 1 to 1024 blocks, got {self.stages}")
            if self.image_size % 32 or (self.width * 32) % self.heads:
                raise ConfigError(f"{where}: a resnet needs image_size a multiple of 32 and heads dividing "
                                  f"width x 32 (the pooled width)")
        elif self.kind == "timm":
            if not self.timm_model:
                raise ConfigError(f"{where}.timm_model: kind timm needs the name of a timm model")
            if self.timm_proj not in ("linear", "mlp", "none", ""):
                raise ConfigError(f"{where}.timm_proj: {self.timm_proj!r} is not one of linear, mlp, none or ''")
            if self.timm_pool in ("abs_attn", "rot_attn") and self.timm_proj == "":
                raise ConfigError(f"{where}.timm_pool {self.timm_pool}: needs timm_proj linear, mlp or none")
        elif self.kind != "vit":
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of vit, resnet, timm")
        else:  # a size that is no multiple of the patch drops the last pixels (as timm: SigLIP 384 / 14)
            if self.image_size < self.patch_size:
                raise ConfigError(f"{where}: image_size {self.image_size} is below patch_size {self.patch_size}")
            _heads_divide(self, where)
        _one_of(self, where, "pool", ("tok", "avg", "attn", "map"))
        if self.pool == "tok" and not self.class_token:
            raise ConfigError(f"{where}.pool tok: needs class_token")
        _one_of(self, where, "act", ACTIVATIONS)
        _one_of(self, where, "resize", ("shortest", "squash"))
        _one_of(self, where, "interpolation", ("bicubic", "bilinear"))
        _positive(self, where, ("attn_pool_queries", "attn_pool_heads"))
        _at_most(self, where, attn_pool_queries=65536, attn_pool_heads=1024)
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ConfigError(
                    f"{where}.{name}: {len(getattr(self, name))} values for in_channels={self.in_channels}")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"{where}.image_std: values must be positive")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    # "clipper": clipper's text transformer; "hf": a Hugging Face transformers encoder (roberta,
    # xlm-roberta, NLLB's, ...) built from `hf_model`'s config as open_clip's HF adapter does, with
    # its pooler and projection (width, layers, heads and mlp_ratio are the HF config's then)
    kind: str = "clipper"
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    # "eot": the end-of-text token's output (the largest id of a row: CLIP BPE's; open_clip's argmax)
    # "eos": the first `eos_id` of a row; "last": the last position of the (padded) input (SigLIP's)
    # "mean": every token sees the whole text, the mean of the outputs from start to end-of-text
    # "cls": CoCa's learned token after the text (position context_length), with open_clip's key
    #        mask: key j is hidden where token j-1 is padding (0), the shifted mask its weights use
    pool: str = "eot"
    # eot/eos/last: attention over the whole padded input, padding included (open_clip's
    # no_causal_mask: SigLIP, MobileCLIP2, CLIPA), instead of causal
    bidirectional: bool = False
    eos_id: int = 2
    proj_bias: bool = False  # the projection is a linear layer with a bias (SigLIP)
    projection: bool = True  # off: the pooled output is the embedding (width = embed_dim)
    act: str = "gelu"  # gelu, gelu_tanh or quick_gelu (the model's quick_gelu overrides it)
    norm_eps: float = 1e-5
    # "": CLIP BPE. Otherwise a Hugging Face tokenizer: a hub name (read from the local HF cache) or
    # a directory, cleaned first (whitespace, lower or canonicalize) as open_clip's HFTokenizer does
    tokenizer: str = ""
    tokenizer_clean: str = "whitespace"
    tokenizer_strip_sep: bool = False  # the separator token becomes padding (CLIPA's BERT tokenizer)
    # hf: a hub name (its config.json read from the local HF cache) or a folder holding config.json;
    # the pooler ("" = the architecture's: mean for roberta, cls for bert and NLLB); the projection
    # ("linear", "mlp", or "": none where the widths match, else linear)
    hf_model: str = ""
    hf_pooler: str = ""
    hf_proj: str = ""

    def validate(self, where: str = "text") -> None:
        _positive(self, where, ("context_length", "vocab_size", "width", "layers", "heads", "mlp_ratio", "norm_eps"))
        _at_most(self, where, context_length=16384, vocab_size=10_000_000, width=16384, layers=1024, heads=1024,
                 mlp_ratio=64)
        _one_of(self, where, "pool", ("eot", "eos", "last", "mean", "cls"))
        _one_of(self, where, "act", ACTIVATIONS)
        _one_of(self, where, "tokenizer_clean", ("whitespace", "lower", "canonicalize"))
        _one_of(self, where, "kind", ("clipper", "hf"))
        if self.kind == "hf":
            if not self.hf_model or not self.tokenizer:
                raise ConfigError(f"{where}.kind hf: needs hf_model and its tokenizer")
            _one_of(self, where, "hf_pooler", ("", "mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"))
            _one_of(self, where, "hf_proj", ("", "linear", "mlp"))
        if self.bidirectional and self.pool in ("mean", "cls"):
            raise ConfigError(f"{where}.bidirectional: for pool eot, eos or last (mean is bidirectional already)")
        if self.context_length < 2:
            raise ConfigError(f"{where}.context_length: needs room for start and end tokens (>= 2)")
        _heads_divide(self, where)

    @property
    def causal(self) -> bool:
        return self.pool in ("eot", "eos", "last") and not self.bidirectional


@dataclass
class DecoderConfig:
    """The captioner, of one of two kinds:
    "prefix": a causal LM of its own whose input starts with the image encoder's tokens (projected);
    "coca": CoCa's multimodal decoder: causal self-attention over the text tower's token outputs,
            cross-attention to the image tower's caption tokens, and a head over the whole BPE
            vocabulary (the text tower is its front half: width must equal text.width)."""
    kind: str = "prefix"
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 32  # text tokens: start, prompt, caption, end
    # Output (and input) vocabulary as CLIP BPE ids, e.g. the tokens of the training captions: a
    # 49,408-way head would cost several times the rest of a small decoder. Empty: all ids.
    vocab: tuple[int, ...] = ()

    def validate(self, where: str = "decoder") -> None:
        if self.kind not in ("prefix", "coca"):
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of prefix, coca")
        _positive(self, where, ("width", "layers", "heads", "mlp_ratio", "context_length"))
        _at_most(self, where, width=16384, layers=1024, heads=1024, mlp_ratio=64, context_length=16384)
        _heads_divide(self, where)
        if self.context_length < 3:
            raise ConfigError(f"{where}.context_length: needs room for start, one token and end (>= 3)")
        if any(v < 0 for v in self.vocab) or len(set(self.vocab)) != len(self.vocab):
            raise ConfigError(f"{where}.vocab: expected distinct token ids (non-negative integers)")


@dataclass
class ModelConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI-trained weights use x * sigmoid(1.702 x)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for the sigmoid (SigLIP) loss
    decoder: DecoderConfig | None = None  # a captioner on top of the image encoder
    # open_clip's name for a text tower kept under "text." in its state dict (CoCa, SigLIP, ...)
    custom_text: bool = False
    # the labels of the set the model was trained on (a labelled set's classnames.txt): the demo's default
    classnames: list[str] | None = None

    def validate(self) -> "ModelConfig":
        _positive(self, "model", ("embed_dim",))
        _at_most(self, "model", embed_dim=65536)
        self.vision.validate()
        self.text.validate()
        v = self.vision
        if v.kind == "vit" and not v.projection and v.width != self.embed_dim:
            raise ConfigError(f"vision.projection off: vision.width {v.width} must equal embed_dim {self.embed_dim}")
        if not self.text.projection and self.text.width != self.embed_dim:
            raise ConfigError(f"text.projection off: text.width {self.text.width} must equal embed_dim {self.embed_dim}")
        if self.decoder is not None:
            self.decoder.validate()
            if self.decoder.kind == "coca":
                self._validate_coca(self.decoder)
        return self

    def _validate_coca(self, d: DecoderConfig) -> None:
        if self.vision.pool != "attn" or self.text.pool != "cls":
            raise ConfigError("decoder.kind coca: needs vision.pool attn (caption tokens) and text.pool cls")
        if d.width != self.text.width or d.width != self.embed_dim:
            raise ConfigError(f"decoder.kind coca: decoder.width {d.width} must equal text.width {self.text.width} "
                              f"and embed_dim {self.embed_dim} (it reads both without a projection)")
        if d.vocab or d.context_length > self.text.context_length:
            raise ConfigError("decoder.kind coca: the vocabulary is the text tower's (decoder.vocab empty) and "
                              "decoder.context_length at most text.context_length")

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data, "model").validate()

    def to_json(self, path: str | os.PathLike) -> None:
        write_config(self, path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        return read_config(cls, path).validate()


def setting(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text: the description of its command-line flag."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class AugmentConfig:
    """Train-time augmentation. Defaults are mild: small crops keep the object the caption names."""
    crop_scale: tuple[float, float] = setting((0.8, 1.0), "area fraction range of the random resized crop")
    crop_ratio: tuple[float, float] = setting((0.9, 1.1), "aspect ratio range of the random resized crop")
    hflip: float = setting(0.0, "probability of a horizontal flip (off: captions may say left or right)")
    color_jitter: float = setting(0.0, "brightness/contrast/saturation jitter strength")
    # style-removing views (issue #18): each a probability per image (hue: the largest shift)
    rotate: float = setting(0.0, "largest rotation in degrees, either way (the corners filled with white)")
    background: float = setting(0.0, "probability that the white background is painted one random colour")
    outline: float = setting(0.0, "probability of a line-art view: the image's edges drawn dark on white")
    grayscale: float = setting(0.0, "probability of a grayscale view")
    hue: float = setting(0.0, "largest hue rotation, a fraction of the colour circle (0 .. 0.5)")
    posterize: float = setting(0.0, "probability of posterising to 2-4 bits a channel")
    blur: float = setting(0.0, "probability of a Gaussian blur of radius 0.5-1.5 px")
    shade: float = setting(0.0, "probability of a light from one side: the drawing (not its white background) "
                                "brightened towards a random direction and darkened away from it")

    def validate(self, where: str = "augment") -> None:
        for name in ("hflip", "background", "outline", "grayscale", "posterize", "blur", "shade"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}.{name}: a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5 or not 0 <= self.rotate <= 180 or not 0 <= self.color_jitter < 1:
            raise ConfigError(f"{where}: hue in [0, 0.5], rotate in [0, 180] and color_jitter in [0, 1) "
                              f"(got {self.hue}, {self.rotate}, {self.color_jitter})")


@dataclass
class TrainConfig:
    """One training run: contrastive, or a captioner on a trained model. Batch sizes are per rank,
    as in open_clip."""
    objective: str = setting("contrastive", "what is trained: contrastive (both towers) or caption "
                                            "(a decoder on the image tower of --init)")
    model: str = setting("fmnist-tiny", "preset name or ModelConfig .json file (random init); with --init, "
                                        "the architecture of an open_clip weights file")
    init: str | None = setting(None, "start from these weights (clipper model dir or open_clip file) "
                                     "instead of random")
    # 0.5, WiSE-FT's own choice: 51 own pairs for a minute kept 18% R@1 on pairs the fine-tune never
    # saw instead of 4%, for 92% instead of 98% on its own (benchmarks/README.md)
    wise_ft: float = setting(0.5, "with --init: the final model is this mix of the fine-tuned weights and the "
                                  "initial ones (WiSE-FT; 1: the fine-tuned weights alone); checkpoints keep "
                                  "the fine-tuned ones")
    decoder: DecoderConfig = setting(help="caption: the decoder added when --init has none (--set decoder.X=...)",
                                     factory=DecoderConfig)
    train_data: str = setting("", "training shards: folder, brace pattern or glob")
    eval_task: str = setting("none", "evaluation during and after training (see `clipper eval --help`), or none")
    eval_data: str | None = setting(None, "shards of the eval split, for --eval-task")
    allow_pipe: bool = setting(False, "train_data and eval_data may be pipe: shard commands (they run in a shell: "
                                      "only for configs you wrote)")
    loss: str = setting("infonce", "contrastive loss: infonce or sigmoid (SigLIP)")
    caption_weight: float = setting(1.0, "caption: weight of the caption loss (open_clip's CoCa fine-tuning: 2.0)")
    contrastive_weight: float = setting(0.0, "caption: weight of a contrastive loss trained with it (CoCa's joint "
                                             "objective; open_clip's CoCa: 1.0); > 0 also trains the text tower "
                                             "and the temperature")
    same_caption_positive: bool = setting(False, "identical captions in a batch are positives, not negatives")
    keywords_prob: float = setting(0.0, "train on the pair's keyword list (json 'keywords') instead of its "
                                        "caption this often")
    keyword_single: float = setting(0.0, "of those times, this share one keyword alone (a word shared by many "
                                         "images: with same_caption_positive, their positives)")
    view_key: str = setting("", "json field naming the thing a sample shows (source_id: the same emoji in every "
                                "style), or caption (a folder's photos of one thing, captioned alike); samples "
                                "next to each other in a shard that share it stay together through the shuffle "
                                "and are positives of each other (empty: off)")
    view_weight: float = setting(0.0, "with view_key: weight of an image-image loss pulling each image towards "
                                      "the other views of its thing")
    view_swap: float = setting(0.0, "with view_key: probability per pair of views that a rectangle (a quarter to "
                                    "half the image) trades places between them, each image then showing two "
                                    "styles")
    feature_style: float = setting(0.0, "probability per training image that the channel statistics of its patch "
                                        "embeddings are redrawn around the batch's spread of them (DSU): styles "
                                        "between and beyond those of the data")
    batch_size: int = setting(256, "samples per step and rank")
    accum_freq: int = setting(1, "micro-batches per step (all negatives of the full batch are kept)")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on gains, biases, embeddings of dim < 2)")
    betas: tuple[float, float] = setting((0.9, 0.98), "AdamW betas")
    eps: float = setting(1e-6, "AdamW epsilon")
    warmup_steps: int = setting(100, "linear warmup steps before the cosine decay (ending by a tenth of the run "
                                     "at the latest)")
    grad_clip: float | None = setting(1.0, "clip the gradient norm to this (null: no clipping)")
    image_lr_scale: float = setting(1.0, "learning-rate multiplier of the image tower")
    text_lr_scale: float = setting(1.0, "learning-rate multiplier of the text tower")
    lock_image: bool = setting(False, "freeze the image tower (LiT; captioners train on a frozen tower)")
    lock_text: bool = setting(False, "freeze the text tower")
    steps: int | None = setting(None, "stop after this many steps (the run ends at the first of steps, "
                                      "epochs, minutes)")
    epochs: float | None = setting(None, "stop after this many epochs")
    minutes: float | None = setting(None, "stop after this much training wall time (the schedule then follows the "
                                          "clock: such runs are not bit-reproducible)")
    seed: int = setting(0, "seed of the initial weights, data order and augmentation")
    workers: int = setting(1, "data loader processes (0: decode in the training process)")
    shuffle_buffer: int = setting(2000, "samples in the shuffle buffer of each reader")
    resampled: bool = setting(False, "draw shards with replacement (an endless stream cut into epochs)")
    min_epoch_batches: int = setting(0, "stretch a small set's epoch to this many batches (workers restart "
                                        "each epoch)")
    decoded_cache_mb: float = setting(512.0, "MiB of decoded training images kept per reader process "
                                             "(small sets decode once)")
    augment: AugmentConfig = setting(help="train-time augmentation (--set augment.X=...)", factory=AugmentConfig)
    log_every: int = setting(10, "steps between lines of metrics.jsonl")
    eval_every: int = setting(0, "steps between evaluations (0: none but the final one and --evals)")
    evals: int = setting(0, "evaluations spread evenly over the run's budget (steps, epochs or minutes), the "
                            "last at the end; their time is not counted in the budget (0: the final one only)")
    checkpoint_every: int = setting(500, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "complete checkpoints kept (older ones are deleted)")
    stop_after: int | None = setting(None, "leave after this many steps of this run, checkpointed (job time "
                                           "limits); continue with --resume")
    precision: str = setting("fp32", "bf16: autocast on CUDA and on CPUs with native bf16 (else fp32)")
    compile: bool = setting(False, "torch.compile the model")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")

    def validate(self) -> "TrainConfig":
        from .evaluate import EVAL_TASKS  # the registries build on this module: imported when used
        from .objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.loss not in ("infonce", "sigmoid"):
            raise ConfigError(f"train.loss: {self.loss!r} is not one of infonce, sigmoid")
        if self.eval_task != "none" and self.eval_task not in EVAL_TASKS:
            raise ConfigError(f"train.eval_task: {self.eval_task!r} is not one of none, {', '.join(EVAL_TASKS)}")
        self.decoder.validate("train.decoder")
        self.augment.validate("train.augment")
        if self.eval_task != "none" and not self.eval_data:
            raise ConfigError(f"train.eval_data: needed for eval_task {self.eval_task}")
        if self.steps is None and self.epochs is None and self.minutes is None:
            raise ConfigError("train: set at least one of steps, epochs, minutes")
        if not 0 <= self.wise_ft <= 1:
            raise ConfigError(f"train.wise_ft: a mix from 0 to 1, got {self.wise_ft}")
        if self.evals < 0:
            raise ConfigError(f"train.evals: must be >= 0, got {self.evals}")
        if self.batch_size % self.accum_freq:
            raise ConfigError(f"train: batch_size {self.batch_size} is not divisible by accum_freq {self.accum_freq}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: {self.precision!r} is not one of fp32, bf16")
        if self.lock_image and self.lock_text:
            raise ConfigError("train: lock_image and lock_text together leave nothing to train")
        for name in ("keywords_prob", "keyword_single", "feature_style", "view_swap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name}: a probability in [0, 1], got {getattr(self, name)}")
        if self.view_weight < 0 or (self.view_weight and not self.view_key):
            raise ConfigError(f"train.view_weight: needs view_key and a weight >= 0, got {self.view_weight}")
        if self.view_swap and not self.view_key:
            raise ConfigError("train.view_swap: needs view_key (the views whose patches trade places)")
        if self.decoded_cache_mb < 0:
            raise ConfigError(f"train.decoded_cache_mb: must be >= 0, got {self.decoded_cache_mb}")
        if self.contrastive_weight < 0 or self.caption_weight <= 0:
            raise ConfigError("train: need caption_weight > 0 and contrastive_weight >= 0")
        _positive(self, "train", ("batch_size", "accum_freq", "lr", "log_every", "checkpoint_every"))
        OBJECTIVES[self.objective].validate(self)
        return self


# Training recipes for 2 CPU cores and a 10-minute budget (benchmarks/README.md: what was tried).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # bf16 where the CPU has it natively (fp32 elsewhere); no worker: on 2 cores a worker process
    # fights the step's two threads (measured 2,458 vs 2,240 samples/s; emoji 1,293 vs 1,009).
    "fmnist-tiny": {"model": "fmnist-tiny", "eval_task": "zeroshot-fmnist", "batch_size": 256, "lr": 2e-3,
                    "weight_decay": 0.1, "warmup_steps": 100, "minutes": 10.0, "workers": 0, "precision": "bf16",
                    "same_caption_positive": True, "eval_every": 0, "evals": 5, "checkpoint_every": 500},
    # No flips or colour jitter: names say "facing right", "red", "medium-dark skin tone". A quarter
    # of the captions are one keyword, shared by several emoji: those count as positives of each other.
    # Trained on two artists' drawings (clipper data emoji --styles noto,twemoji), an emoji's two
    # renderings are views of one thing, pulled together by the view loss (weight 1 chosen on the
    # never-trained styles' val split; on a one-style set the key groups nothing). Posterize 0.2: the
    # one style-removing view that led on that split at equal steps (benchmarks/README.md, stop 30).
    "emoji-small": {"model": "emoji-small", "eval_task": "retrieval-emoji", "batch_size": 256, "lr": 1e-3,
                    "weight_decay": 0.3, "warmup_steps": 50, "minutes": 10.0, "workers": 0, "precision": "bf16",
                    "keywords_prob": 0.5, "keyword_single": 0.5, "same_caption_positive": True,
                    "view_key": "source_id", "view_weight": 1.0,
                    "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.9, 1.1], "posterize": 0.2},
                    "eval_every": 0, "evals": 5, "checkpoint_every": 500, "min_epoch_batches": 64},
}


# Captioners: stage 1 (image tower frozen) on a contrastive model trained with the preset above.
TRAIN_PRESETS |= {
    "emoji-captioner": {"objective": "caption", "eval_task": "captioning-emoji", "batch_size": 128, "lr": 1e-3,
                        "weight_decay": 0.05, "warmup_steps": 50, "minutes": 10.0, "workers": 1, "lock_image": True,
                        "decoder": {"width": 128, "layers": 3, "heads": 4, "context_length": 32},
                        "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.9, 1.1]},
                        "evals": 5, "checkpoint_every": 500, "min_epoch_batches": 64},
    "fmnist-captioner": {"objective": "caption", "eval_task": "captioning-fmnist", "batch_size": 128, "lr": 1e-3,
                         "weight_decay": 0.05, "warmup_steps": 50, "minutes": 10.0, "workers": 1, "lock_image": True,
                         "decoder": {"width": 128, "layers": 2, "heads": 4, "context_length": 24},
                         "evals": 5, "checkpoint_every": 500},
}


# Fine-tuning a pretrained CoCa on one's own pairs: its joint objective with open_clip's weights
# (--coca-contrastive-loss-weight 1, --coca-caption-loss-weight 2) and a fine-tuning learning rate.
TRAIN_PRESETS["coca-finetune"] = {"objective": "caption", "contrastive_weight": 1.0, "caption_weight": 2.0,
                                  "lock_image": False, "batch_size": 32, "lr": 1e-5, "weight_decay": 0.1,
                                  "warmup_steps": 20, "epochs": 5.0, "workers": 1, "checkpoint_every": 200}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r} (presets: {', '.join(TRAIN_PRESETS)})")
    return from_dict(TrainConfig, TRAIN_PRESETS[name], "train")


def merge_train_config(preset_name: str | None = None, file: str | os.PathLike | None = None,
                       overrides: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> TrainConfig:
    """A run's settings, each layer over the one before: a named preset (else the defaults), a
    TrainConfig JSON file (only the fields it names), `overrides` (the CLI's flags), then
    `FIELD=VALUE` strings (`--set`: a JSON value or a bare string, nested fields with dots)."""
    data = dataclasses.asdict(train_preset(preset_name) if preset_name else TrainConfig())
    if file is not None:
        layer = _read_json_object(file)
        try:
            _deep_update(data, layer, "train")
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    data.update(overrides or {})
    for item in sets:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings need no quotes
        *parents, leaf = name.split(".")
        target = data
        for part in parents:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"--set {name}: {part!r} is not a section of the training config")
            target = target[part]
        target[leaf] = value
    return from_dict(TrainConfig, data, "train").validate()


def _deep_update(data: dict[str, Any], layer: Any, where: str) -> None:
    if not isinstance(layer, dict):
        raise ConfigError(f"{where}: expected an object, got {type(layer).__name__}")
    for key, value in layer.items():
        if isinstance(data.get(key), dict) and isinstance(value, dict):
            _deep_update(data[key], value, f"{where}.{key}")
        else:
            data[key] = value  # unknown fields are refused by from_dict, naming them


def write_config(config: Any, path: str | os.PathLike) -> None:
    """A config dataclass as JSON, written atomically."""
    io.write_json(path, dataclasses.asdict(config))


def _read_json_object(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable ({e.strerror})") from None


def read_config(cls: type, path: str | os.PathLike) -> Any:
    """Dataclass `cls` from a JSON file; errors name the file and the field."""
    data = _read_json_object(path)
    try:
        return from_dict(cls, data, cls.__name__.replace("Config", "").lower() or "config")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _heads_divide(cfg: Any, where: str) -> None:
    if cfg.width % cfg.heads:
        raise ConfigError(f"{where}: width {cfg.width} is not divisible by heads {cfg.heads}")


def mlp_ratio_of(width: int, hidden: int) -> float:
    """The mlp_ratio whose int(width * ratio) is `hidden` (4304 / 1152 in floating point gives 4303)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _one_of(obj: Any, where: str, name: str, choices: Sequence[str]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{where}.{name}: {getattr(obj, name)!r} is not one of {', '.join(choices)}")


def _at_most(obj: Any, where: str, **limits: float) -> None:
    """Upper bounds, checked before anything is built (a config.json asking for 10^6 layers is refused)."""
    for name, limit in limits.items():
        if getattr(obj, name) > limit:
            raise ConfigError(f"{where}.{name}: {getattr(obj, name)} is over the limit of {limit}")


def _positive(obj: Any, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be positive, got {getattr(obj, name)}")


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data` (nested dataclasses too), refusing unknown fields and
    values of the wrong type; errors name the field's path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        inner = [a for a in typing.get_args(hints[name]) if a is not type(None)]
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], value, f"{where}.{name}")
        elif value is not None and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # Optional[config]
            kwargs[name] = from_dict(inner[0], value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Check a JSON value against a field's type hint (int, float, bool, str, tuple of numbers, list
    of strings, or any of these `| None`); ints are accepted where floats go, lists become tuples."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is int:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    elif typing.get_origin(hint) is tuple:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


# --- presets --------------------------------------------------------------------------------

# Fashion-MNIST: 28x28 grayscale, one channel in; 7x7 patches give a 4x4 grid (16 tokens).
# Normalisation statistics of the Fashion-MNIST training images.
_PRESETS: dict[str, dict[str, Any]] = {
    "fmnist-tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 28, "patch_size": 7, "width": 128, "layers": 4, "heads": 4,
                   "in_channels": 1, "image_mean": [0.2860], "image_std": [0.3530]},
        "text": {"context_length": 16, "width": 128, "layers": 3, "heads": 4},
    },
    # Emoji: the 64x64 renders seen at 48 px through 8x8 patches (36 tokens). At 32 px (16 tokens)
    # retrieval saturated after ~7 of the 10 minutes; 48 px scored better on a held-out shard
    # (benchmarks/README.md, E6-E7). A context of 32 holds every name and keyword list.
    "emoji-small": {
        "embed_dim": 128,
        "vision": {"image_size": 48, "patch_size": 8, "width": 128, "layers": 4, "heads": 2,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "text": {"context_length": 32, "width": 128, "layers": 3, "heads": 2},
    },
}

# open_clip config fields that clipper implements, with the values it supports; any other field
# with a non-default value is refused rather than silently ignored.
# (output_tokens only says what open_clip's forward returns.)
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
           "custom_text", "multimodal_cfg"}
_OC_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "pool_type",
              "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "output_tokens", "no_ln_pre",
              "final_ln_after_pool", "timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
              "timm_drop_path"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type", "embed_cls",
            "output_tokens", "no_causal_mask", "proj_bias", "eos_id", "norm_kwargs", "act_kwargs",
            "hf_tokenizer_name", "tokenizer_kwargs", "proj_type", "hf_model_name", "hf_pooler_type", "hf_proj_type",
            "hf_model_pretrained"}
# CoCa's decoder; open_clip's MultimodalTransformer does not read dim_head, n_queries, attn_pooler_heads
_OC_MULTIMODAL = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "dim_head", "n_queries",
                  "attn_pooler_heads"}
_OC_DEFAULT_OK = {"patch_dropout": 0.0, "ls_init_value": None, "timm_model_pretrained": False,
                  "pos_embed_type": "learnable", "correct_cls_mask": False,
                  "pad_id": 0, "block_type": None, "qk_norm": False,
                  "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                  "scale_fc": False, "custom_text": False, "tokenizer_mode": None}
_OC_TEXT_POOL = {"argmax": "eot", "eos": "eos", "last": "last"}  # open_clip's text pool_type -> ours


def _text_from_open_clip(name: str, tc: dict[str, Any]) -> TextConfig:
    if tc.get("hf_model_name"):  # open_clip's HF adapter (hf_model_pretrained: the weights come from the checkpoint)
        return TextConfig(kind="hf", context_length=tc.get("context_length", 77), hf_model=tc["hf_model_name"],
                          hf_pooler=tc.get("hf_pooler_type") or "", hf_proj=tc.get("hf_proj_type") or "",
                          tokenizer=tc.get("hf_tokenizer_name") or tc["hf_model_name"])
    pool = tc.get("pool_type", "argmax")
    if pool not in _OC_TEXT_POOL:
        raise ConfigError(f"open_clip config {name}: text_cfg.pool_type={pool!r} is not supported")
    if tc.get("proj_type", "linear") not in ("linear", "none"):
        raise ConfigError(f"open_clip config {name}: text_cfg.proj_type={tc['proj_type']!r} is not supported")
    norm, act = dict(tc.get("norm_kwargs") or {}), dict(tc.get("act_kwargs") or {})
    tok = dict(tc.get("tokenizer_kwargs") or {})
    for what, extra in (("norm_kwargs", set(norm) - {"eps"}), ("act_kwargs", set(act) - {"approximate"}),
                        ("tokenizer_kwargs", set(tok) - {"clean", "strip_sep_token"})):
        if extra:
            raise ConfigError(f"open_clip config {name}: text_cfg.{what} {sorted(extra)} is not supported by clipper")
    if act.get("approximate", "none") not in ("none", "tanh"):
        raise ConfigError(f"open_clip config {name}: text_cfg.act_kwargs.approximate={act['approximate']!r}")
    return TextConfig(
        context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
        width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
        mlp_ratio=float(tc.get("mlp_ratio", 4.0)), pool="cls" if tc.get("embed_cls") else _OC_TEXT_POOL[pool],
        bidirectional=bool(tc.get("no_causal_mask", False)) and not tc.get("embed_cls"),
        eos_id=tc.get("eos_id", 2), proj_bias=bool(tc.get("proj_bias", False)),
        projection=tc.get("proj_type", "linear") != "none",
        act="gelu_tanh" if act.get("approximate") == "tanh" else "gelu", norm_eps=float(norm.get("eps", 1e-5)),
        tokenizer=tc.get("hf_tokenizer_name") or "", tokenizer_clean=tok.get("clean", "whitespace"),
        tokenizer_strip_sep=bool(tok.get("strip_sep_token", False)))


def _vision_from_open_clip(name: str, vc: dict[str, Any]) -> VisionConfig:
    if not isinstance(vc.get("image_size", 224), int):
        raise ConfigError(f"open_clip config {name}: only square image towers are supported")
    if vc.get("timm_model_name"):
        timm = VisionConfig(kind="timm", image_size=vc.get("image_size", 224), timm_model=vc["timm_model_name"],
                            timm_pool=vc.get("timm_pool", "avg"), timm_proj=vc.get("timm_proj", "linear") or "",
                            timm_proj_bias=bool(vc.get("timm_proj_bias", False)),
                            timm_drop=float(vc.get("timm_drop", 0.0)), timm_drop_path=vc.get("timm_drop_path"))
        from .model.timm_tower import as_own_vit  # reads timm's network: imported only here

        return as_own_vit(timm) or timm
    resnet = isinstance(vc.get("layers"), (list, tuple))
    if vc.get("pool_type", "tok") not in ("tok", "avg"):
        raise ConfigError(f"open_clip config {name}: vision_cfg.pool_type={vc['pool_type']!r} is not supported")
    if vc.get("attentional_pool", False) not in (False, True):  # "parallel"/"cascade": open_clip's untested WIP
        raise ConfigError(f"open_clip config {name}: vision_cfg.attentional_pool={vc['attentional_pool']!r} "
                          "is not supported")
    width = vc.get("width", 768)
    return VisionConfig(
        kind="resnet" if resnet else "vit", stages=tuple(vc["layers"]) if resnet else (),
        image_size=vc.get("image_size", 224), patch_size=32 if resnet else vc.get("patch_size", 16), width=width,
        layers=len(vc["layers"]) if resnet else vc.get("layers", 12),
        heads=width * (32 if resnet else 1) // vc.get("head_width", 64),
        mlp_ratio=float(vc.get("mlp_ratio", 4.0)),
        pool="attn" if vc.get("attentional_pool") else vc.get("pool_type", "tok"),
        attn_pool_queries=vc.get("attn_pooler_queries", 256), attn_pool_heads=vc.get("attn_pooler_heads", 8),
        ln_pre=not vc.get("no_ln_pre", False), norm_after_pool=bool(vc.get("final_ln_after_pool", False)))


def from_open_clip_config(name: str, oc: dict[str, Any] | None = None) -> ModelConfig:
    """Translate open_clip's model config `name` (its shipped JSON) into a ModelConfig."""
    if oc is None:
        import open_clip

        oc = open_clip.get_model_config(name)
        if oc is None:
            raise ConfigError(f"{name!r} is neither a clipper preset nor an open_clip model config")
    _refuse_unsupported(name, oc, _OC_TOP, "")
    vc, tc = dict(oc["vision_cfg"]), dict(oc["text_cfg"])
    _refuse_unsupported(name, vc, _OC_VISION, "vision_cfg.")
    _refuse_unsupported(name, tc, _OC_TEXT, "text_cfg.")
    decoder = None
    if "multimodal_cfg" in oc:
        mc = dict(oc["multimodal_cfg"])
        _refuse_unsupported(name, mc, _OC_MULTIMODAL, "multimodal_cfg.")
        if mc.get("vocab_size", 49408) != tc.get("vocab_size", 49408):
            raise ConfigError(f"open_clip config {name}: multimodal_cfg.vocab_size differs from the text tower's")
        decoder = DecoderConfig(kind="coca", width=mc.get("width", 512), layers=mc.get("layers", 12),
                                heads=mc.get("heads", 8), mlp_ratio=float(mc.get("mlp_ratio", 4)),
                                context_length=mc.get("context_length", 77))
    cfg = ModelConfig(
        embed_dim=oc["embed_dim"],
        vision=_vision_from_open_clip(name, vc),
        text=_text_from_open_clip(name, tc),
        quick_gelu=bool(oc.get("quick_gelu", False)),
        init_logit_scale=float(oc.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=oc.get("init_logit_bias"),
        decoder=decoder,
        custom_text=bool(oc.get("custom_text", False)) or decoder is not None or "hf_model_name" in tc,
    )
    return cfg.validate()


def _refuse_unsupported(name: str, section: dict[str, Any], supported: set[str], prefix: str) -> None:
    for key, value in section.items():
        if key in supported:
            continue
        if key in _OC_DEFAULT_OK and value == _OC_DEFAULT_OK[key]:
            continue
        raise ConfigError(f"open_clip config {name}: {prefix}{key}={value!r} is not supported by clipper")


def list_presets() -> list[str]:
    """clipper's own presets, then every open_clip config clipper can build."""
    import open_clip

    names = list(_PRESETS)
    for name in open_clip.list_models():
        try:
            from_open_clip_config(name)
        except (ConfigError, KeyError, TypeError):
            continue
        names.append(name)
    return names


def preset(name: str) -> ModelConfig:
    """The named config: a clipper preset or an open_clip model name (e.g. 'ViT-B-32')."""
    if name in _PRESETS:
        return ModelConfig.from_dict(_PRESETS[name])
    config = from_open_clip_config(name)
    settings = _tag_preprocessing(name)
    if settings is not None:  # every pretrained tag of the architecture preprocesses alike: that way
        apply_open_clip_preprocessing(config.vision, settings)
    return config


def _tag_preprocessing(name: str) -> dict[str, Any] | None:
    import open_clip

    found = {json.dumps({k: open_clip.get_pretrained_cfg(name, tag).get(k) for k in _PREPROCESS}, sort_keys=True)
             for tag in open_clip.list_pretrained_tags_by_model(name)}
    return json.loads(found.pop()) if len(found) == 1 else None


_PREPROCESS = ("mean", "std", "interpolation", "resize_mode")


def apply_open_clip_preprocessing(vision: VisionConfig, tag_cfg: dict[str, Any]) -> None:
    """Take mean/std, interpolation and resize mode from an open_clip pretrained config, where it says."""
    if tag_cfg.get("mean") and tag_cfg.get("std"):
        vision.image_mean = tuple(float(v) for v in tag_cfg["mean"])
        vision.image_std = tuple(float(v) for v in tag_cfg["std"])
    if tag_cfg.get("interpolation") in ("bicubic", "bilinear"):
        vision.interpolation = tag_cfg["interpolation"]
    if tag_cfg.get("resize_mode") in ("shortest", "squash"):
        vision.resize = tag_cfg["resize_mode"]
