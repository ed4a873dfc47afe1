"""Streaming (image, text) batches from webdataset shards, for training and for evaluation.

Training: each epoch the shard list is shuffled (seeded by epoch) and split by rank, then by
DataLoader worker, so readers see disjoint shards; every worker yields the same fixed number of
batches (cycling its own shards if they run short), so every rank gets the same batch count.
With `resampled=True` each reader instead draws shards with replacement: an endless stream cut
into epochs of the same fixed length. Evaluation visits every sample once, in shard order.

With a `view_key` (a json field naming the thing a sample shows, or "caption": the caption
itself), consecutive samples sharing it are one unit through the shuffle, so the views of one
thing (the same emoji in two styles; a folder's photos of one product) land in the same batch,
and each batch carries their group ids for the loss.

Bad samples (truncated tar members, undecodable images, over-limit images, missing, empty or
non-UTF-8 captions) are skipped; each batch carries the skips met since the previous batch, so
the main process can count and report them (`SkipLog`) whatever worker met them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ModelConfig
from ..train_config import AugmentConfig, TrainConfig
from ..distributed import rank_and_world
from ..errors import ConfigError, DataError, ImageError
from ..images import MAX_PIXELS, decode_image
from ..tokenizer import tokenizer_for
from .instructions import question_answers
from .reader import IMAGE_EXTS, Skip, list_shards, read_tar, shard_sizes
from .shards import reason_kind
from .sources import read_caption
from .transforms import Preprocess, TrainTransform

# captions -> a tensor of rows, one per caption (stacked into the batch's "text")
Tokenizing = Callable[[list[str]], torch.Tensor]


class DecodedCache:
    """Decoded training images kept in memory up to a byte budget, keyed by (shard, key): a small
    set is read many times per run and its decoding (PNG inflate) then costs more than the crop."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.images: dict[tuple[str, str], Image.Image] = {}

    def get(self, url: str, key: str) -> Image.Image | None:
        return self.images.get((url, key))

    def put(self, url: str, key: str, im: Image.Image) -> None:
        size = im.width * im.height * len(im.getbands())
        if self.used + size <= self.budget:  # full: later images are decoded each time
            self.images[(url, key)] = im
            self.used += size


# view_key naming the caption (the .txt member) rather than a json field
CAPTION_VIEWS = "caption"


class SampleDecoder:
    """Raw sample -> (image tensor, token ids, key, metadata, caption, view) or a Skip with the
    reason. Captions are tokenized for the text tower, or by `tokenizer` (a captioner's rows);
    `view` is the sample's `view_key` value as a string (a key of its own where it has none; None
    without a view_key). Training keeps decoded images in a `DecodedCache` of `cache_mb` MiB."""

    def __init__(self, config: ModelConfig, train: bool, augment: AugmentConfig | None = None,
                 max_pixels: int = MAX_PIXELS, keywords_prob: float = 0.0, tokenizer: Tokenizing | None = None,
                 cache_mb: float = 0.0, keyword_single: float = 0.0, view_key: str = "", instructions: float = 0.0,
                 seed: int = 0):
        self.image_size = config.vision.image_size
        # uint8 per sample (a quarter of the bytes through the worker queue); `normalize` per batch
        preprocessing = Preprocess(config.vision)
        self.transform = TrainTransform(config.vision, augment or AugmentConfig()) if train else preprocessing.resize
        self.normalize = preprocessing.normalize
        # a captioner's rows (CLIP BPE to its context, or its language model's); else the text tower's
        self.tokenizer = tokenizer or tokenizer_for(config.text)
        self.max_pixels = max_pixels
        self.keywords_prob = keywords_prob if train else 0.0
        self.keyword_single = keyword_single
        self.rng = random.Random(0)
        self.cache = DecodedCache(int(cache_mb * 2**20) if train else 0)
        self.view_key = view_key
        self.instructions = instructions if train else 0.0
        self.views, self.seed = (augment.views if train and augment else 0), seed

    def reseed(self, seed: str) -> None:
        self.rng = random.Random(seed + "-captions")
        self.transform.reseed(seed)

    def _text(self, text: str, meta: dict) -> str:
        """The caption, or (training, with probability keywords_prob) the pair's keyword list, or
        (a `keyword_single` share of those times) one keyword of it."""
        keywords = meta.get("keywords")
        if self.keywords_prob and keywords and self.rng.random() < self.keywords_prob:
            if self.keyword_single and self.rng.random() < self.keyword_single:
                return self.rng.choice(keywords)
            return " | ".join(keywords)
        return text

    def __call__(self, sample: dict | Skip) -> tuple | Skip:
        if isinstance(sample, Skip):
            return sample
        key, url = sample["__key__"], sample["__url__"]
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            return Skip(url, key, "no image member")
        if "txt" not in sample:
            return Skip(url, key, "no txt member")
        try:
            text = read_caption(sample["txt"], key)
        except ValueError as e:
            return Skip(url, key, str(e).split(": ", 1)[-1])
        im = self.cache.get(url, key)
        if im is None:
            where = f"{key}.{ext}"
            try:  # large JPEGs decode at a reduced scale that still covers the model's size
                im = decode_image(sample[ext], where, self.max_pixels, draft_size=self.image_size)
            except ImageError as e:
                reason = str(e).removeprefix(f"{where}: ")
                return Skip(url, key, reason if "pixel limit" in reason else f"not a readable image ({reason})")
            self.cache.put(url, key, im)
        if self.views:  # one of the image's `views` fixed views (their features can be cached)
            self.transform.reseed(f"{self.seed}-view-{key}-{self.rng.randrange(self.views)}")
        pixels = self.transform(im)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return Skip(url, key, "json member is not valid JSON")
        view = None
        if self.view_key:  # the value `view_units` found; a sample without one is a group of its own
            view = sample.get("__view__") or f"\0{url}/{key}"
        text = self._text(text, meta)
        return pixels, self.tokenizer([self._instruction(text, meta)])[0], key, meta, text, view

    def _instruction(self, text: str, meta: dict) -> str | tuple[str, str, str]:
        """The caption, or (an `instructions` share of the samples with a conversation) one of its
        turns as (question, answer, caption), for a tokenizer of chats."""
        if self.instructions and self.rng.random() < self.instructions:
            turns = question_answers(meta.get("conversations"))
            if turns:
                return (*self.rng.choice(turns), text)
        return text


# a unit of views is cut at this many samples: a shard whose samples all share one value cannot
# make the reader hold the whole shard
MAX_VIEWS = 16


def raw_view_of(sample: dict | Skip, view_key: str) -> str | None:
    """A raw sample's view value: its caption for view_key "caption", else its json field; None
    where it has none (a damaged member too: the decoder names it)."""
    if isinstance(sample, Skip):
        return None
    try:
        if view_key == CAPTION_VIEWS:
            value = sample["txt"].decode("utf-8").strip() if "txt" in sample else None
        else:
            value = (json.loads(sample["json"]) if "json" in sample else {}).get(view_key)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    return None if value is None or value == "" else str(value)


def view_units(samples: Iterator[dict | Skip], view_key: str) -> Iterator[list[dict | Skip]]:
    """Consecutive samples whose `view_key` value (json field, or the caption) is equal, as lists
    of at most MAX_VIEWS; a sample without one is a unit of its own. Each sample keeps its value
    (`__view__`) for the decoder, which then need not find it again."""
    unit: list[dict | Skip] = []
    current = None
    for sample in samples:
        value = raw_view_of(sample, view_key)
        if not isinstance(sample, Skip):
            sample["__view__"] = value
        if unit and (value is None or value != current or len(unit) == MAX_VIEWS):
            yield unit
            unit = []
        unit.append(sample)
        current = value
    if unit:
        yield unit


def group_id(value: str) -> int:
    """A stable int64 id of a view value (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def batches(items: Iterator[tuple | Skip], batch_size: int, drop_last: bool,
            normalize: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict]:
    """Collate decoded samples (uint8 images, `normalize`d as one batch); each batch carries the
    skips met since the previous one, and where the samples have views the group id of each."""
    rows: list[tuple] = []
    skipped: list[Skip] = []

    def collate() -> dict:
        images, tokens, keys, metas, captions, views = zip(*rows) if rows else ((), (), (), (), (), ())
        batch = {"image": normalize(torch.stack(images)) if rows else torch.empty(0),
                 "text": torch.stack(tokens) if rows else torch.empty(0, dtype=torch.long),
                 "key": list(keys), "meta": list(metas), "caption": list(captions), "skipped": list(skipped)}
        if views and views[0] is not None:
            batch["group"] = torch.tensor([group_id(v) for v in views], dtype=torch.long)
        return batch

    for item in items:
        if isinstance(item, Skip):
            skipped.append(item)
            continue
        rows.append(item)
        if len(rows) == batch_size:
            yield collate()
            rows.clear()
            skipped.clear()
    if (rows and not drop_last) or skipped:
        yield collate()


class ShardDataset(IterableDataset):
    """Batches from shards: see the module docstring for the training and evaluation behaviour."""

    def __init__(self, shards, config: ModelConfig, batch_size: int, train: bool = True,
                 augment: AugmentConfig | None = None, seed: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 2000, rank: int | None = None, world: int | None = None,
                 max_pixels: int = MAX_PIXELS, keywords_prob: float = 0.0, tokenizer: Tokenizing | None = None,
                 min_epoch_batches: int = 0, cache_mb: float = 0.0, keyword_single: float = 0.0,
                 view_key: str = "", allow_pipe: bool | None = None, instructions: float = 0.0):
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"batch_size: must be positive, got {batch_size}")
        self.shards = list_shards(shards, allow_pipe)
        self.sizes = shard_sizes(self.shards)
        if train and not self.num_samples:
            raise DataError(f"{shards}: the shards hold no readable sample")
        self.decoder = SampleDecoder(config, train, augment, max_pixels=max_pixels, keywords_prob=keywords_prob,
                                     tokenizer=tokenizer, cache_mb=cache_mb, keyword_single=keyword_single,
                                     view_key=view_key if train else "", instructions=instructions, seed=seed)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.min_epoch_batches, self.view_key = min_epoch_batches, view_key
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.epoch = 0
        self.num_workers = 1  # set by make_loader; the per-worker batch count depends on it

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def batches_per_worker(self) -> int:
        """One pass over the samples, or `min_epoch_batches` (a small set: the readers make more
        passes within the epoch, since every epoch restarts the DataLoader workers)."""
        one_pass = self.num_samples // (self.world * self.num_workers * self.batch_size)
        return max(1, one_pass, -(-self.min_epoch_batches // self.num_workers))

    def batches_per_epoch(self) -> int:
        """Per rank; the same on every rank (training), every sample once (evaluation)."""
        if self.train:
            return self.batches_per_worker() * self.num_workers
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _my_shards(self, worker: int, workers: int, rng: random.Random) -> list[str]:
        if self.resampled:
            return rng.choices(self.shards, k=max(1, len(self.shards) // (self.world * workers)))
        order = list(self.shards)
        random.Random(f"{self.seed}-epoch-{self.epoch}").shuffle(order)  # same order on every reader
        mine = order[self.rank::self.world][worker::workers]
        if not mine:
            raise ConfigError(f"{len(self.shards)} shard(s) cannot feed {self.world} rank(s) x {workers} worker(s): "
                             "each reader needs one; write smaller shards or use fewer workers")
        return mine

    def _train_samples(self, worker: int, workers: int) -> Iterator[dict | Skip]:
        """This reader's samples, shuffled within each pass over its shards; a reader whose
        shards run short of its batch quota starts another pass."""
        shard_rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        for cycle in itertools.count():
            shards = self._my_shards(worker, workers, shard_rng)
            raw = (s for shard in shards for s in read_tar(shard))
            rng = random.Random(f"{self.seed}-shuffle-{self.epoch}-{self.rank}-{worker}-{cycle}")
            shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
            if not self.view_key:
                yield from shuffle(raw)
            else:  # units of views through the shuffle, then their samples one after the other
                yield from (s for unit in shuffle(view_units(raw, self.view_key)) for s in unit)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        if not self.train:
            raw = (s for shard in self.shards[worker::workers] for s in read_tar(shard))
            yield from batches(map(self.decoder, raw), self.batch_size, False, self.decoder.normalize)
            return
        self.decoder.reseed(f"{self.seed}-augment-{self.epoch}-{self.rank}-{worker}")
        stream = batches(map(self.decoder, self._train_samples(worker, workers)), self.batch_size, True,
                         self.decoder.normalize)
        yield from itertools.islice(stream, self.batches_per_worker())


def training_dataset(cfg: TrainConfig, config: ModelConfig, rank: int | None = None, world: int | None = None,
                     tokenizer: Tokenizing | None = None) -> ShardDataset:
    """The training stream `cfg` describes (its shards, batch, augmentation, captions, cache) for a
    model of `config`; captions tokenized by `tokenizer` where given (a captioner's rows)."""
    return ShardDataset(cfg.train_data, config, cfg.batch_size, train=True, augment=cfg.augment, seed=cfg.seed,
                        resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, rank=rank, world=world,
                        keywords_prob=cfg.keywords_prob, tokenizer=tokenizer,
                        min_epoch_batches=cfg.min_epoch_batches, cache_mb=cfg.decoded_cache_mb,
                        keyword_single=cfg.keyword_single, view_key=cfg.view_key,
                        allow_pipe=cfg.allow_pipe or None, instructions=cfg.instructions)


@dataclass
class SkipLog:
    """Skipped samples seen by the main process, for the end-of-epoch report."""
    skipped: list[Skip] = field(default_factory=list)

    def add(self, batch: dict) -> None:
        self.skipped.extend(batch.get("skipped", []))

    def summary(self) -> str:
        if not self.skipped:
            return "no sample skipped"
        by_reason = Counter(reason_kind(s.reason) for s in self.skipped)
        first = "; ".join(f"{Path(s.shard).name}:{s.key}: {s.reason}" for s in self.skipped[:5])
        return (f"{len(self.skipped)} sample(s) skipped ("
                + ", ".join(f"{n} {r}" for r, n in by_reason.most_common()) + f"), e.g. {first}")

    def clear(self) -> None:
        self.skipped.clear()


def make_loader(dataset: ShardDataset, workers: int = 0) -> DataLoader:
    """A DataLoader over `dataset` (batches are made in the workers)."""
    if workers < 0:
        raise ConfigError(f"workers: must be >= 0, got {workers}")
    dataset.num_workers = max(1, workers)
    # A private generator: each iter() draws the workers' base seed from it, not from torch's global
    # RNG, whose stream a resumed run must replay draw for draw (the dataset seeds its own RNGs).
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers else None, collate_fn=_as_is, generator=torch.Generator())


def _as_is(batch: dict) -> dict:
    # The default (default_convert) walks every caption and metadata list of every batch.
    return batch
