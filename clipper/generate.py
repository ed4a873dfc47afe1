"""Caption generation: greedy, beam search, sampling (temperature, top-k, top-p), repetition
penalty, min/max new tokens, several captions per image, prompts of different lengths.

Each image is encoded once; its prefix and prompt run once (`prefill`), and every later step feeds
one token through the KV cache. Beams and extra samples copy the cache rows, not the image.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .model import CLIP
from .tokenizer import Tokenizer
from .config import setting
from .errors import ConfigError


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = setting(None, "most tokens to generate (default: what the decoder's context "
                                               "leaves after the prompt)")
    min_new_tokens: int = setting(0, "no end-of-text before this many tokens")
    num_beams: int = setting(1, "beam search with this many beams (1: greedy or sampling)")
    length_penalty: float = setting(1.0, "beam hypotheses are ranked by log-prob / length ** length_penalty")
    do_sample: bool = setting(False, "sample (temperature, top-k, top-p) instead of greedy/beam")
    temperature: float = setting(1.0, "sampling temperature")
    top_k: int = setting(0, "sample among the k most likely tokens (0: no limit)")
    top_p: float = setting(1.0, "sample among the most likely tokens that reach this probability (nucleus)")
    repetition_penalty: float = setting(1.0, "> 1 discourages tokens already in the prompt or the caption")
    num_return_sequences: int = setting(1, "captions per image (sampling, or the best beams)")
    seed: int | None = setting(None, "sampling seed: a fixed seed gives the same captions")
    use_cache: bool = setting(True, "decode with the KV cache (--no-use-cache: recompute the whole sequence "
                                    "each step, the slow reference)")

    def validate(self) -> "GenerationConfig":
        if (self.max_new_tokens is not None and self.max_new_tokens < 1) or self.min_new_tokens < 0 or \
                self.min_new_tokens > (self.max_new_tokens or self.min_new_tokens):
            raise ConfigError("generation: need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ConfigError("generation: num_beams and num_return_sequences must be >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("generation: beam search with sampling is not supported; choose one")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError("generation: num_return_sequences cannot exceed num_beams")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ConfigError("generation: several captions need do_sample or num_beams >= num_return_sequences")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("generation: need temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        return self


class _Text:
    """Prompts as left-padded vocabulary indices, and the special tokens."""

    def __init__(self, model: CLIP):
        self.decoder = model.decoder
        self.tokenizer = Tokenizer(model.config.decoder.context_length)
        self.eot = int(self.decoder.to_vocab(torch.tensor([self.tokenizer.eot_id]))[0])

    def prompts(self, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.tokenizer.sot_id, *self.tokenizer.encode(p)] for p in prompts]
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids = self.decoder.to_vocab(torch.tensor(row), f"prompt {prompts[i]!r}")
            tokens[i, T - len(row):], valid[i, T - len(row):] = ids, True
        return tokens.to(device), valid.to(device)

    def texts(self, prompts: Sequence[str], per_image: list[list[list[int]]]) -> list[list[str]]:
        """Each image's prompt followed by its generated vocabulary indices, as text; one lookup of
        BPE ids for all of them (a tensor op per caption costs as much as a decode step's)."""
        flat = [i for seqs in per_image for seq in seqs for i in seq]
        bpe = iter(self.decoder.ids[torch.tensor(flat, dtype=torch.long)].tolist() if flat else [])
        out = []
        for prompt, seqs in zip(prompts, per_image):
            ids = self.tokenizer.encode(prompt)
            out.append([self.tokenizer.decode(ids + [next(bpe) for _ in seq]) for seq in seqs])
        return out


def _process(logits: torch.Tensor, seen: torch.Tensor, step: int, cfg: GenerationConfig, eot: int) -> torch.Tensor:
    """Penalties and limits on next-token logits [R, V]; `seen` [R, V] marks tokens already present."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if step < cfg.min_new_tokens:
        logits[:, eot] = -float("inf")
    return logits


def _sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


class _DecodeState:
    """Next-token logits with the KV cache, or by recomputing the sequence (use_cache=False)."""

    def __init__(self, model: CLIP, image_tokens, tokens, valid, cfg: GenerationConfig):
        self.decoder, self.cfg = model.decoder, cfg
        if cfg.use_cache:
            self.logits, self.cache = self.decoder.prefill(image_tokens, tokens, valid, cfg.max_new_tokens)
        else:
            self.image_tokens, self.tokens, self.valid = image_tokens, tokens, valid
            self.logits = self.decoder.full_logits(image_tokens, tokens, valid)

    def select(self, rows: torch.Tensor) -> None:
        self.logits = self.logits[rows]
        if self.cfg.use_cache:
            self.cache = self.cache.select(rows)
        else:
            self.image_tokens, self.tokens, self.valid = self.image_tokens[rows], self.tokens[rows], self.valid[rows]

    def feed(self, token: torch.Tensor) -> None:
        if self.cfg.use_cache:
            self.logits = self.decoder.decode(token, self.cache)
        else:
            self.tokens = torch.cat([self.tokens, token[:, None]], 1)
            self.valid = torch.cat([self.valid, self.valid.new_ones(len(token), 1)], 1)
            self.logits = self.decoder.full_logits(self.image_tokens, self.tokens, self.valid)


def _seen(tokens: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, tokens, valid)


def _greedy_or_sample(state: _DecodeState, seen: torch.Tensor, text: _Text, cfg: GenerationConfig) -> list[list[int]]:
    R, device = seen.shape[0], seen.device
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    rows = torch.arange(R, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    # one token per row per step, read back once at the end (no per-step Python work per row); a row
    # that has ended keeps going until all have (rows are independent) and is cut at its first end
    steps = []
    for step in range(cfg.max_new_tokens):
        token = _sample(_process(state.logits, seen, step, cfg, text.eot), cfg, generator)
        steps.append(token)
        done |= token == text.eot
        if step == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        if cfg.repetition_penalty != 1.0:
            seen[rows, token] = True
        state.feed(token)
    return [row[:row.index(text.eot)] if text.eot in row else row for row in torch.stack(steps, 1).tolist()]


def _beam_search(state: _DecodeState, seen: torch.Tensor, text: _Text, cfg: GenerationConfig) -> list[list[list[int]]]:
    """Per image, its best `num_return_sequences` beams (stopping once `num_beams` have ended)."""
    B, k = seen.shape[0], cfg.num_beams
    rows = torch.arange(B).repeat_interleave(k)
    state.select(rows.to(seen.device))
    seen = seen[rows.to(seen.device)]
    scores = torch.zeros(B, k)
    scores[:, 1:] = -float("inf")  # all beams start as copies: only the first may expand at first
    seqs: list[list[int]] = [[] for _ in range(B * k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for step in range(cfg.max_new_tokens):
        logp = _process(state.logits, seen, step, cfg, text.eot).log_softmax(dim=-1).cpu()
        V = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(B, k * V)
        top_scores, top_index = cand.topk(min(2 * k, k * V), dim=1)
        new_rows, new_tokens, new_scores = [], [], torch.full((B, k), -float("inf"))
        for b in range(B):
            kept = 0
            for s, i in zip(top_scores[b].tolist(), top_index[b].tolist()):
                origin, token = b * k + i // V, i % V
                if s == -float("inf"):
                    break
                if token == text.eot or step == cfg.max_new_tokens - 1:
                    seq = seqs[origin] + ([] if token == text.eot else [token])
                    if len(finished[b]) < k:
                        finished[b].append((s / (step + 1) ** cfg.length_penalty, seq))
                    continue
                if kept < k:
                    new_rows.append(origin)
                    new_tokens.append(token)
                    new_scores[b, kept] = s
                    kept += 1
            while kept < k:  # pad with dead beams so that every image keeps k rows
                new_rows.append(b * k)
                new_tokens.append(text.eot)
                kept += 1
        if all(len(f) >= k for f in finished) or step == cfg.max_new_tokens - 1:
            break
        scores = new_scores
        index = torch.tensor(new_rows)
        seqs = [seqs[r] + [t] for r, t in zip(new_rows, new_tokens)]
        token = torch.tensor(new_tokens, device=seen.device)
        seen = seen[index.to(seen.device)]
        seen[torch.arange(B * k), token] = True
        state.select(index.to(seen.device))
        state.feed(token)
    best = []
    for f in finished:
        f.sort(key=lambda x: -x[0])
        best.append([seq for _, seq in f[:cfg.num_return_sequences]])
    return best


@torch.inference_mode()
def generate(model: CLIP, pixels: torch.Tensor, prompts: Sequence[str] | None = None,
             cfg: GenerationConfig | None = None) -> list[list[str]]:
    """Captions [image][sequence] for preprocessed images [B, C, H, W]; `prompts` (one per image,
    or none) start each caption and are returned as part of it."""
    if model.decoder is None:
        raise ConfigError("this model has no caption decoder (train one with `clipper train-captioner`)")
    cfg = (cfg or GenerationConfig()).validate()
    text = _Text(model)
    B = pixels.shape[0]
    prompts = list(prompts) if prompts is not None else [""] * B
    if len(prompts) != B:
        raise ConfigError(f"prompts: {len(prompts)} for {B} image(s)")
    device = model.device
    tokens, valid = text.prompts(prompts, device)
    room = model.config.decoder.context_length - int(valid.sum(1).max())
    if cfg.max_new_tokens is None:
        cfg = dataclasses.replace(cfg, max_new_tokens=room)
    if not cfg.min_new_tokens <= cfg.max_new_tokens <= room:
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens}: the longest prompt leaves room for {room} "
                         f"(decoder context {model.config.decoder.context_length}), and min_new_tokens "
                         f"{cfg.min_new_tokens} must fit")
    image_tokens = model.visual.tokens(pixels.to(device))
    state = _DecodeState(model, image_tokens, tokens, valid, cfg)
    seen = _seen(tokens, valid, model.decoder.vocab_size)
    if cfg.num_beams > 1:
        per_image = _beam_search(state, seen, text, cfg)
    else:
        n = cfg.num_return_sequences
        if n > 1:  # several samples per image: copy the prefilled cache rows, not the image
            rows = torch.arange(B, device=device).repeat_interleave(n)
            state.select(rows)
            seen = seen[rows]
        flat = _greedy_or_sample(state, seen, text, cfg)
        per_image = [flat[i * n:(i + 1) * n] for i in range(B)]
    return text.texts(prompts, per_image)


def caption(model: CLIP, images, prompt: str | Sequence[str] | None = None, batch_size: int = 32,
            **options) -> list[str] | list[list[str]]:
    """Captions of PIL images or image paths (the model's own preprocessing). `prompt`: one for
    all images or one per image. `options`: GenerationConfig fields. One caption per image, or
    a list per image when num_return_sequences > 1."""
    from .data.transforms import eval_transform
    from .images import open_image

    cfg = GenerationConfig(**options).validate()
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    images = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
    prompts = [prompt] * len(images) if prompt is None or isinstance(prompt, str) else list(prompt)
    transform = eval_transform(model.config.vision)
    out: list[list[str]] = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([transform(im) for im in images[i:i + batch_size]])
        part = prompts[i:i + batch_size]
        out += generate(model, pixels, None if prompt is None else part, cfg)
    return [c[0] for c in out] if cfg.num_return_sequences == 1 else out
