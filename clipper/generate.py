"""Caption generation: greedy, beam search, sampling (temperature, top-k, top-p), repetition
penalty, min/max new tokens, several captions per image, prompts of different lengths.

Each image is encoded once; its prefix and prompt run once (`prefill`), and every later step feeds
one token through the KV cache. Beams and extra samples copy the cache rows, not the image. The
engine drives any decoder through its `Captioner` and reads its token ids through its `Codec`
(clipper.model.decoders): it knows no tokenizer. The recompute path (`use_cache=False`) is the
naive reference the cached one is tested against.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .config import setting
from .errors import ConfigError
from .images import open_image

if TYPE_CHECKING:  # the model offers `caption` as a verb: it imports this module
    from .model import CLIP
    from .model.decoders import Captioner, Codec


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = setting(None, "most tokens to generate (default: what the decoder's context "
                                               "leaves after the prompt)")
    min_new_tokens: int = setting(0, "no end-of-text before this many tokens")
    num_beams: int = setting(1, "beam search with this many beams (1: greedy or sampling)")
    length_penalty: float = setting(1.0, "beam hypotheses are ranked by score / length ** length_penalty (length: "
                                         "every token, start, prompt and end included)")
    beam_score: str = setting("logprob", "what a beam adds up per token: logprob, or logit (raw logits: open_clip's "
                                         "CoCa beam search, to reproduce its captions)")
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
        if self.beam_score not in ("logprob", "logit"):
            raise ConfigError(f"generation: beam_score {self.beam_score!r} is not one of logprob, logit")
        # bounds, not just signs: a temperature of 1e-308 or a length penalty of 1e308 makes infinite
        # scores, and sampling or ranking them fails deep in torch
        if not (0.01 <= self.temperature <= 100 and 0 < self.top_p <= 1 and 0 <= self.top_k <= 1 << 20
                and 0.01 <= self.repetition_penalty <= 100):
            raise ConfigError("generation: need 0.01 <= temperature <= 100, 0 < top_p <= 1, 0 <= top_k <= 2**20, "
                              "0.01 <= repetition_penalty <= 100")
        if not -10 <= self.length_penalty <= 10:
            raise ConfigError(f"generation: length_penalty {self.length_penalty:g}: need -10 to 10")
        return self


def _left_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows as [B, T] left-padded with 0, and which positions are real."""
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, T - len(row):], valid[i, T - len(row):] = torch.tensor(row, dtype=torch.long), True
    return tokens.to(device), valid.to(device)


def _process(logits: torch.Tensor, seen: torch.Tensor, step: int, cfg: GenerationConfig,
             ends: Sequence[int]) -> torch.Tensor:
    """Penalties and limits on next-token logits [R, V]; `seen` [R, V] marks tokens already
    present; before min_new_tokens, the token(s) `ends` are forbidden."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if step < cfg.min_new_tokens:
        logits[:, list(ends)] = -float("inf")
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

    def __init__(self, captioner, image_tokens, tokens, valid, cfg: GenerationConfig):
        self.captioner, self.cfg = captioner, cfg
        if cfg.use_cache:
            self.logits, self.cache = self.captioner.prefill(image_tokens, tokens, valid, cfg.max_new_tokens)
        else:
            self.image_tokens, self.tokens, self.valid = image_tokens, tokens, valid
            self.logits = self.captioner.full_logits(image_tokens, tokens, valid)

    def select(self, rows: torch.Tensor) -> None:
        self.logits = self.logits[rows]
        if self.cfg.use_cache:
            self.cache = self.cache.select(rows)
        else:
            self.image_tokens, self.tokens, self.valid = self.image_tokens[rows], self.tokens[rows], self.valid[rows]

    def feed(self, token: torch.Tensor) -> None:
        if self.cfg.use_cache:
            self.logits = self.captioner.decode(token, self.cache)
        else:
            self.tokens = torch.cat([self.tokens, token[:, None]], 1)
            self.valid = torch.cat([self.valid, self.valid.new_ones(len(token), 1)], 1)
            self.logits = self.captioner.full_logits(self.image_tokens, self.tokens, self.valid)


def _seen(tokens: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, tokens, valid)


def _greedy_or_sample(state: _DecodeState, seen: torch.Tensor, codec: Codec, cfg: GenerationConfig,
                      stream: Callable[[torch.Tensor], bool | None] | None = None) -> list[list[int]]:
    R, device = seen.shape[0], seen.device
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    rows = torch.arange(R, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    # one token per row per step, read back once at the end (no per-step Python work per row); a row
    # that has ended keeps going until all have (rows are independent) and is cut at its first end
    steps = []
    stops = torch.tensor(codec.stop_ids, device=device)
    for step in range(cfg.max_new_tokens):
        token = _sample(_process(state.logits, seen, step, cfg, codec.end_ids), cfg, generator)
        steps.append(token)
        if stream is not None and stream(token):  # the caller ends every row here (a stop string)
            break
        done |= torch.isin(token, stops)
        if step == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        if cfg.repetition_penalty != 1.0:
            seen[rows, token] = True
        state.feed(token)
    return [_until(row, codec.stop_ids) for row in torch.stack(steps, 1).tolist()]


def _until(row: list[int], stops: Sequence[int]) -> list[int]:
    """`row` up to its first stop token."""
    ends = [row.index(t) for t in stops if t in row]
    return row[:min(ends)] if ends else row


class _Hypotheses:
    """An image's best `k` finished beams, as (score, tokens): the bookkeeping of Hugging Face's
    BeamHypotheses, which open_clip's CoCa beam search uses."""

    def __init__(self, k: int, length_penalty: float):
        self.k, self.length_penalty = k, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, total: float, tokens: list[int], length: int) -> None:
        score = total / length ** self.length_penalty
        if len(self.beams) < self.k or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.k:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_total: float, length: int) -> bool:
        """No running beam can still beat the worst kept one (the heuristic: at the current length)."""
        return len(self.beams) >= self.k and self.worst >= best_total / length ** self.length_penalty

    def best(self, n: int) -> list[list[int]]:
        return [tokens for _, tokens in sorted(self.beams, key=lambda b: b[0], reverse=True)[:n]]


def _beam_search(state: _DecodeState, seen: torch.Tensor, codec: Codec, cfg: GenerationConfig,
                 prompt_lengths: list[int]) -> list[list[list[int]]]:
    """Per image, its best `num_return_sequences` of `num_beams` beams. Each step ranks the 2k best
    continuations: an end-of-text among the first k finishes a hypothesis, the best k others run on;
    an image is done when no running beam can beat its k finished ones, and at max_new_tokens its
    running beams join them (Hugging Face's beam search, early_stopping=False)."""
    B, k = seen.shape[0], cfg.num_beams
    rows = torch.arange(B).repeat_interleave(k)
    state.select(rows.to(seen.device))
    seen = seen[rows.to(seen.device)]
    scores = torch.zeros(B, k)
    scores[:, 1:] = -1e9  # all beams start as copies: only the first may expand at first
    seqs: list[list[int]] = [[] for _ in range(B * k)]
    hyps = [_Hypotheses(k, cfg.length_penalty) for _ in range(B)]
    ends = set(codec.end_ids)
    done = [False] * B
    for step in range(cfg.max_new_tokens):
        processed = _process(state.logits, seen, step, cfg, codec.end_ids)
        step_scores = processed.log_softmax(dim=-1) if cfg.beam_score == "logprob" else processed
        V = step_scores.shape[1]
        cand = (scores.view(-1, 1) + step_scores.cpu()).view(B, k * V)
        top_scores, top_index = cand.topk(min(2 * k, k * V), dim=1)
        new_rows, new_tokens, new_scores = [], [], torch.zeros(B, k)
        for b in range(B):
            length = prompt_lengths[b] + step + 1  # with this step's token
            kept = 0
            if not done[b]:
                for rank, (s, i) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                    origin, token = b * k + i // V, i % V
                    if token in ends:
                        if rank < k:
                            hyps[b].add(s, seqs[origin], length)
                        continue
                    new_rows.append(origin)
                    new_tokens.append(token)
                    new_scores[b, kept] = s
                    kept += 1
                    if kept == k:
                        break
                done[b] = hyps[b].done(top_scores[b, 0].item(), length)
            for j in range(kept, k):  # a finished image keeps k rows (never read)
                new_rows.append(b * k + j)
                new_tokens.append(codec.end_id)
        seqs = [seqs[r] + [t] for r, t in zip(new_rows, new_tokens)]
        scores = new_scores
        if all(done):
            break
        if step == cfg.max_new_tokens - 1:  # out of room: the running beams count as they are
            for b in range(B):
                if not done[b]:
                    for j in range(k):
                        hyps[b].add(scores[b, j].item(), seqs[b * k + j], prompt_lengths[b] + step + 1)
            break
        index = torch.tensor(new_rows, device=seen.device)
        token = torch.tensor(new_tokens, device=seen.device)
        seen = seen[index]
        seen[torch.arange(B * k, device=seen.device), token] = True
        state.select(index)
        state.feed(token)
    return [h.best(cfg.num_return_sequences) for h in hyps]


@torch.inference_mode()
def generate(model: CLIP, pixels: torch.Tensor, prompts: Sequence[str] | None = None,
             cfg: GenerationConfig | None = None) -> list[list[str]]:
    """Captions [image][sequence] for preprocessed images [B, C, H, W]; `prompts` (one per image,
    or none) start each caption and are returned as part of it."""
    with model.autocast():  # the model's inference precision (bf16 where chosen)
        return _generate(model, pixels, prompts, cfg)


def _generate(model: CLIP, pixels: torch.Tensor, prompts: Sequence[str] | None,
              cfg: GenerationConfig | None) -> list[list[str]]:
    if model.decoder is None:
        raise ConfigError("this model has no caption decoder (train one with `clipper train-captioner`)")
    cfg = (cfg or GenerationConfig()).validate()
    captioner = model.captioner()
    codec = captioner.codec
    B = pixels.shape[0]
    prompts = list(prompts) if prompts is not None else [""] * B
    if len(prompts) != B:
        raise ConfigError(f"prompts: {len(prompts)} for {B} image(s)")
    image_tokens = model.decoder.image_tokens(model.visual, pixels.to(model.device))
    per_image = generate_ids(captioner, image_tokens, model.decoder.prompt_rows(model, pixels, prompts, codec), cfg)
    return codec.texts(prompts, per_image)


def generate_ids(captioner: Captioner, image_tokens: torch.Tensor, rows: list[list[int]], cfg: GenerationConfig,
                 stream: Callable[[torch.Tensor], bool | None] | None = None) -> list[list[list[int]]]:
    """The engine: the new ids [row][sequence] after each prompt row (the decoder's ids) over its
    image's tokens [B, ...]. `stream`: called with each step's tokens [B] (greedy and sampling);
    when it returns True the generation ends after that step's tokens."""
    codec, context = captioner.codec, captioner.context_length
    B, device = len(rows), image_tokens.device
    tokens, valid = _left_padded(rows, device)
    lengths = valid.sum(1).tolist()
    room = context - max(lengths)
    if cfg.max_new_tokens is None:
        cfg = dataclasses.replace(cfg, max_new_tokens=room)
    if not cfg.min_new_tokens <= cfg.max_new_tokens <= room:
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens}: the longest prompt leaves room for {room} "
                          f"(decoder context {context}), and min_new_tokens "
                          f"{cfg.min_new_tokens} must fit")
    state = _DecodeState(captioner, image_tokens, tokens, valid, cfg)
    seen = _seen(tokens, valid, codec.vocab_size)
    if cfg.num_beams > 1:
        return _beam_search(state, seen, codec, cfg, lengths)
    n = cfg.num_return_sequences
    if n > 1:  # several samples per image: copy the prefilled cache rows, not the image
        index = torch.arange(B, device=device).repeat_interleave(n)
        state.select(index)
        seen = seen[index]
    flat = _greedy_or_sample(state, seen, codec, cfg, stream)
    return [flat[i * n:(i + 1) * n] for i in range(B)]


def caption(model: CLIP, images, prompt: str | Sequence[str] | None = None, batch_size: int = 32,
            **options) -> list[str] | list[list[str]]:
    """Captions of PIL images or image paths (the model's own preprocessing). `prompt`: one for
    all images or one per image. `options`: GenerationConfig fields. One caption per image, or
    a list per image when num_return_sequences > 1."""
    cfg = GenerationConfig(**options).validate()
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    images = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
    prompts = [prompt] * len(images) if prompt is None or isinstance(prompt, str) else list(prompt)
    transform = model.preprocessing
    out: list[list[str]] = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([transform(im) for im in images[i:i + batch_size]])
        part = prompts[i:i + batch_size]
        out += generate(model, pixels, None if prompt is None else part, cfg)
    return [c[0] for c in out] if cfg.num_return_sequences == 1 else out
