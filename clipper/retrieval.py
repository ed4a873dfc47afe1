"""Retrieval for captioning prompts (SmallCap's recipe on clipper's own embeddings): a datastore of
captions embedded by a contrastive model's text tower, and, for training, each training caption's
neighbours: the captions nearest to its image, never the caption itself.

    clipper datastore --model RUN/model --data data/shards/emoji/train --out DIR

builds one from any shards' captions, to swap in at inference (`clipper caption --datastore DIR`)."""

from __future__ import annotations

from collections.abc import Iterable

from .embed import embed_texts
from .errors import ConfigError, DataError
from .model import CLIP
from .model.decoders.datastore import Datastore


def build_datastore(model: CLIP, captions: Iterable[str]) -> Datastore:
    """The distinct `captions` (in first-seen order) and their normalised text embeddings."""
    unique = list(dict.fromkeys(c for c in captions if c))
    if not unique:
        raise DataError("datastore: no captions to embed")
    return Datastore(unique, embed_texts(model, unique, to_numpy=False).float())


def caption_neighbours(model: CLIP, data: str, datastore: Datastore, k: int,
                       allow_pipe: bool | None = None) -> dict[str, list[str]]:
    """For each caption of the shards `data`, the k datastore captions nearest to its first image
    (the model's preprocessing, no augmentation), the caption itself excluded."""
    import torch

    from .data.pipeline import ShardDataset, make_loader

    dataset = ShardDataset(data, model.config, 256, train=False, rank=0, world=1, allow_pipe=allow_pipe)
    out: dict[str, list[str]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in make_loader(dataset):
            if not batch["key"]:
                continue
            features = model.encode_image(batch["image"].to(model.device), normalize=True)
            found = datastore.nearest(features, k, [{c} for c in batch["caption"]])
            for caption, near in zip(batch["caption"], found):
                out.setdefault(caption, near)
    model.train(was_training)
    return out


def use_datastore(model: CLIP, folder: str) -> None:
    """Retrieve from the datastore `folder` in place of the model's own (a llava decoder with retrieve)."""
    if getattr(model, "decoder", None) is None or not getattr(model.config.decoder, "retrieve", 0):
        raise ConfigError("--datastore: for a model whose decoder retrieves captions (decoder.retrieve > 0)")
    model.decoder.datastore = Datastore.load(folder)
