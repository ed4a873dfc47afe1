"""The llava decoder kind: a pretrained causal language model (SmolLM2, any Llama/Qwen2, whatever
transformers builds) reads the model's image tower, LLaVA's way. The tower's hidden states at
`feature_layer` (the class token dropped or kept: `select`; each `shuffle` x `shuffle` block of
them in one, Idefics3's pixel shuffle) go through a projector (`mlp2x_gelu` or `linear`) into the
language model's embedding, in place of the `<image>` token's copies in its own chat template:
the user turn holds the image and the question (`prompt`), the caption is the assistant's answer,
and the loss covers the answer and its end of turn only.

Training rows are the language model's ids, not CLIP BPE: `training_tokenizer` renders each
caption as that chat and returns [2, context_length] per caption (ids; 0 padding, 1 prompt,
2 answer), so the trainer's resume, DDP, budgets and evaluations run it as any decoder. A saved
model holds the language model's config and tokenizer in its folder (`language_model/`), its
weights in model.safetensors; `clipper convert --to hf` writes transformers' LLaVA folder of it.

With `retrieve` k (SmallCap's recipe), the question follows the k captions of a datastore nearest
to the image by the model's own embeddings: built from the training captions unless given, never a
training caption's own, saved in the model's `datastore/`, and swappable at inference."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...config import DecoderConfig, ModelConfig
from ...errors import ConfigError
from .base import Decoder, TextCodec
from .chat import ChatText, ImageText, user_message
from .datastore import Datastore, retrieval_prompt
from .language import LanguageModel, _transformers, lm_with_tokens, smollm2_gguf
from .llama import LlamaLM, native_supported
from .lora import add_lora, merge_lora
from .projector import MLPProjector, pixel_shuffle
from .spliced import IGNORE, SplicedCaptioner

LANGUAGE_DIR = "language_model"  # in a saved model's folder: the language model's config and tokenizer
DATASTORE_DIR = "datastore"  # and the retrieval datastore, where the decoder retrieves
IMAGE_TOKEN = "<image>"
PAD, PROMPT, ANSWER = 0, 1, 2  # the second row of a training row: what each position holds

# Put in front of a tokenizer's chat template (written for string contents), it reads the
# processors' content lists too ({"type": "image"} as "<image>\n", then the text): transformers'
# LlavaProcessor and clipper's ChatProcessor render the exported folder's chats as training did.
CONTENT_LISTS = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set flat.messages = flat.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '<image>\\n' -%}"
    "{%- else -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': text.value}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = flat.messages %}")


def selected_tokens(model: ModelConfig, select: str) -> int:
    """The tower's tokens a decoder reads: transformers' count (every token, less the first with the
    default strategy)."""
    return model.vision.grid ** 2 + int(model.vision.class_token) - int(select == "default")


def image_token_count(model: ModelConfig, cfg: DecoderConfig) -> int:
    """Tokens per image in the prompt: the selected ones, or the grid's after the pixel shuffle."""
    return (model.vision.grid // cfg.shuffle) ** 2 if cfg.shuffle > 1 else selected_tokens(model, cfg.select)


class AnswerCodec(TextCodec):
    """The language model's ids: a prompt is the user turn (the image, the question: `default`
    where empty) and the assistant's start; texts are the answers alone."""

    def __init__(self, processor, image_text: str, default: str, vocab_size: int, end_ids: Sequence[int]):
        self.processor, self.image_text, self.default = processor, image_text, default
        self.vocab_size, self.end_id, self.stop_ids = vocab_size, end_ids[0], tuple(end_ids)

    @property
    def end_ids(self) -> tuple[int, ...]:
        return self.stop_ids

    def prompt(self, text: str) -> list[int]:
        p = self.processor
        return p.encode(p.render([user_message(text or self.default)]), [self.image_text])

    def texts(self, prompts: Sequence[str], per_image: list[list[list[int]]]) -> list[list[str]]:
        return [[self.processor.decode(seq) for seq in seqs] for seqs in per_image]


class ChatRows:
    """Captions -> training rows [N, 2, length]: each caption as the answer to `prompt` about the
    image (ids, right-padded; and per position PAD, PROMPT or ANSWER). An item may be a (question,
    answer, caption) instruction turn instead. With `neighbours`, a caption's retrieved captions go
    into its prompt, as many as leave the row within `length` (the farthest dropped first, so the
    answer keeps its end); a row still longer is cut at `length`."""

    def __init__(self, processor, prompt: str, image_text: str, length: int,
                 neighbours: dict[str, list[str]] | None = None):
        self.processor, self.prompt, self.image_text, self.length = processor, prompt, image_text, length
        self.neighbours = neighbours or {}

    def __call__(self, items: str | Sequence[str | tuple[str, str, str]]) -> torch.Tensor:
        items = [items] if isinstance(items, str) else items
        out = torch.zeros(len(items), 2, self.length, dtype=torch.long)
        for i, item in enumerate(items):
            question, answer, caption = item if isinstance(item, tuple) else (self.prompt, item, item)
            near = list(self.neighbours.get(caption, ()))
            while True:
                ids, labels = self.processor.answer_row(retrieval_prompt(question, near), answer, [self.image_text])
                if len(ids) <= self.length or not near:
                    break
                near.pop()
            n = min(len(ids), self.length)
            out[i, 0, :n] = torch.tensor(ids[:n])
            out[i, 1, :n] = torch.tensor([PROMPT if x == IGNORE else ANSWER for x in labels[:n]])
        return out


class LlavaDecoder(SplicedCaptioner, Decoder):
    """Projector + language model; it is its own `Captioner` (the engine's image tokens are the
    tower's hidden states, projected at prefill)."""
    bpe_vocabulary = False
    reads_instructions = True

    def __init__(self, cfg: DecoderConfig, vision_width: int, tokens_per_image: int, lm_config, tokenizer):
        super().__init__()
        self.cfg, self.lm_config, self.tokenizer = cfg, lm_config, tokenizer
        width = int(lm_config.hidden_size)
        features = vision_width * cfg.shuffle ** 2
        self.projector = MLPProjector(features, width) if cfg.projector == "mlp2x_gelu" else \
            nn.Sequential(nn.Linear(features, width))
        self.language = LlamaLM(lm_config) if native_supported(lm_config) else \
            LanguageModel(lm_config, "decoder.language_model")
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str):
            raise ConfigError(f"decoder.language_model {cfg.language_model}: its tokenizer has no chat template "
                              "(an instruction-tuned model has one)")
        image_text = ImageText(IMAGE_TOKEN, tokens_per_image)
        self.processor = ChatText(Path(cfg.language_model or "."), tokenizer, CONTENT_LISTS + template, image_text)
        self.image_token_id = self.processor.image_token_id
        self.image_text = image_text(1, 1)
        eos = getattr(lm_config, "eos_token_id", None)
        ends = [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
        self.codec = AnswerCodec(self.processor, self.image_text, cfg.prompt, int(lm_config.vocab_size),
                               list(dict.fromkeys(i for i in ends if isinstance(i, int))))
        self.context_length = cfg.context_length
        self.retrieves = cfg.retrieve
        self.datastore = Datastore.load(cfg.datastore) if cfg.retrieve and cfg.datastore else None
        self.neighbours: dict[str, list[str]] = {}  # training captions' retrieved ones (the caption objective's)

    @classmethod
    def check(cls, cfg: DecoderConfig, model: ModelConfig) -> None:
        if model.vision.kind != "vit":
            raise ConfigError(f"decoder.kind llava: reads a ViT's hidden states; this model's image tower is "
                              f"{model.vision.kind}")
        if not -model.vision.layers - 1 <= cfg.feature_layer <= model.vision.layers:
            raise ConfigError(f"decoder.feature_layer {cfg.feature_layer}: the image tower has "
                              f"{model.vision.layers} layers")
        if cfg.shuffle > 1 and (model.vision.grid % cfg.shuffle or
                                selected_tokens(model, cfg.select) != model.vision.grid ** 2):
            raise ConfigError(f"decoder.shuffle {cfg.shuffle}: needs the grid's tokens alone (select default with "
                              f"a class token, full without) and a grid it divides ({model.vision.grid})")
        if cfg.context_length <= image_token_count(model, cfg):
            raise ConfigError(f"decoder.context_length {cfg.context_length}: the image alone takes "
                              f"{image_token_count(model, cfg)} tokens; leave room for the chat")

    @classmethod
    def for_model(cls, cfg: DecoderConfig, model: ModelConfig) -> "LlavaDecoder":
        """Built on the meta device (a saved model: the weights come next), the language model's
        config and tokenizer are read from its folder; else the language model is loaded whole
        (a folder, or a GGUF file dequantised), `<image>` added to its tokenizer and embedding,
        and a fresh projector put in front."""
        source = cfg.language_model or str(smollm2_gguf())
        cfg = dataclasses.replace(cfg, language_model=source)
        tokens = image_token_count(model, cfg)
        if torch.empty(()).is_meta:
            transformers = _transformers()
            if not (Path(source) / "config.json").is_file():
                raise ConfigError(f"decoder.language_model {source}: not a folder holding config.json")
            decoder = cls(cfg, model.vision.width, tokens, transformers.AutoConfig.from_pretrained(source),
                          transformers.AutoTokenizer.from_pretrained(source))
        else:
            lm, tokenizer = lm_with_tokens(source, [IMAGE_TOKEN])
            decoder = cls(cfg, model.vision.width, tokens, lm.config, tokenizer)
            decoder.language.load_weights(lm.state_dict(), source)
        if cfg.lora:
            add_lora(decoder.language, cfg.lora)
        return decoder

    def set_lora(self, rank: int) -> None:
        """LoRA adapters of `rank` on the language model, in place of any it has (those merged into
        its weights first; 0: merged, none added)."""
        if self.cfg.lora:
            merge_lora(self.language)
        if rank:
            add_lora(self.language, rank)
        self.cfg = dataclasses.replace(self.cfg, lora=rank)

    # --- what the trainer and the engine read ----------------------------------------------------
    def image_tokens(self, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The tower's hidden states at `feature_layer` (the first token dropped with `default`)."""
        states = visual.hidden_states(images, [self.cfg.feature_layer])[0]
        return states[:, 1:] if self.cfg.select == "default" else states

    def image_inputs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(pixel_shuffle(image_tokens, self.cfg.shuffle))

    def training_tokenizer(self) -> ChatRows:
        return ChatRows(self.processor, self.cfg.prompt, self.image_text, self.cfg.context_length, self.neighbours)


    def prompt_rows(self, model: nn.Module, pixels: torch.Tensor, prompts: Sequence[str],
                    codec: TextCodec) -> list[list[int]]:
        """Each prompt (empty: `prompt`), after the `retrieve` captions nearest to its image."""
        prompts = [p or self.cfg.prompt for p in prompts]
        if self.cfg.retrieve:
            prompts = [retrieval_prompt(p, near) for p, near in zip(prompts, self.retrieved(model, pixels))]
        return [codec.prompt(p) for p in prompts]

    def retrieved(self, model: nn.Module, pixels: torch.Tensor) -> list[list[str]]:
        """The `retrieve` datastore captions nearest to each image (preprocessed by the model)."""
        if self.datastore is None:
            raise ConfigError(f"decoder.retrieve {self.cfg.retrieve}: the model has no datastore (give one)")
        with torch.no_grad():
            return self.datastore.nearest(model.encode_image(pixels.to(model.device), normalize=True),
                                          self.cfg.retrieve)

    def target_counts(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, 1] == ANSWER).sum(1)

    def pretrained_parts(self) -> list[nn.Module]:
        return [self.language]

    def captioner(self, text: nn.Module) -> "LlavaDecoder":
        return self

    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor | None = None) -> dict:
        """Teacher-forced loss of training rows [B, 2, L] (`ChatRows`) on the answers' tokens."""
        role = tokens[:, 1]
        length = int((role != PAD).sum(1).max())
        ids, role = tokens[:, 0, :length], role[:, :length]
        labels = ids.masked_fill(role != ANSWER, IGNORE)
        loss = self.answer_loss(image_tokens, ids, labels, role != PAD)
        return {"loss": loss, "tokens": torch.tensor(float((role == ANSWER).sum()))}

    def bundle(self, path: Path) -> DecoderConfig:
        """The language model's config and tokenizer in `path`/language_model (replaced whole), and
        the datastore in `path`/datastore."""
        target, tmp = path / LANGUAGE_DIR, path / f".tmp-{LANGUAGE_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.lm_config.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        if target.exists():  # (even the folder it was read from: the tokenizer is in memory)
            shutil.rmtree(target)
        tmp.rename(target)
        if self.datastore is None:
            return dataclasses.replace(self.cfg, language_model=LANGUAGE_DIR, datastore="")
        self.datastore.save(path / DATASTORE_DIR)
        return dataclasses.replace(self.cfg, language_model=LANGUAGE_DIR, datastore=DATASTORE_DIR)
