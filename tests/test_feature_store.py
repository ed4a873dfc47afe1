"""The frozen tower's feature store: each image computed once (in a batch too), kept in memory
within its budget and on disk, read back equal, a damaged file computed again; its namespace
changes with what computes the features; an augmented image's view is one of `views` fixed ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipper.config import ModelConfig
from clipper.data.pipeline import SampleDecoder
from clipper.errors import ConfigError
from clipper.feature_store import FeatureStore, fingerprint
from clipper.run_config import check_train_config
from clipper.train_config import AugmentConfig, TrainConfig


class Counting:
    def __init__(self, scale: float = 2.0):
        self.rows, self.scale = 0, scale

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.rows += len(pixels)
        return pixels.flatten(1)[:, :4] * self.scale


def test_each_image_is_computed_once_and_read_back_from_disk(tmp_path):
    pixels = torch.randn(3, 2, 4, 4)
    batch = torch.cat([pixels, pixels[:1]])  # the first image twice in one batch
    compute = Counting()
    store = FeatureStore("ns", tmp_path)
    first = store(batch, compute)
    assert compute.rows == 3 and torch.equal(first, compute(batch))
    assert torch.equal(store(batch, compute), first) and compute.rows == 3 + 4  # (the check's own 4)
    assert (store.hits, store.misses) == (5, 3)
    files = sorted((tmp_path / "ns").glob("*/*.safetensors"))
    assert len(files) == 3
    files[0].write_bytes(b"not a safetensors file")  # damaged: computed again and rewritten
    again = Counting()
    fresh = FeatureStore("ns", tmp_path)
    assert torch.equal(fresh(batch, again), first) and again.rows == 1
    assert torch.equal(FeatureStore("ns", tmp_path)(batch, Counting(scale=0)), first)  # all read back
    assert torch.equal(FeatureStore("other", tmp_path)(batch, Counting(scale=0)), torch.zeros_like(first))


def test_rows_past_the_budget_are_computed_every_time():
    compute = Counting()
    store = FeatureStore("ns", max_bytes=2 * 4 * 4)  # room for two rows of 4 floats
    pixels = torch.randn(3, 2, 4, 4)
    store(pixels, compute)
    store(pixels, compute)
    assert len(store.rows) == 2 and compute.rows == 3 + 1


def test_the_fingerprint_follows_what_computes_the_features():
    assert fingerprint(Counting(), (2, 4, 4)) == fingerprint(Counting(), (2, 4, 4))
    assert fingerprint(Counting(), (2, 4, 4)) != fingerprint(Counting(scale=3.0), (2, 4, 4))


def _decoder(views: int) -> SampleDecoder:
    config = ModelConfig.from_dict({"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 4, "width": 16,
                                                                 "layers": 1, "heads": 2},
                                    "text": {"context_length": 8, "width": 16, "layers": 1, "heads": 2}})
    return SampleDecoder(config, train=True, augment=AugmentConfig(crop_scale=(0.3, 1.0), views=views), seed=5)


def _png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("views", [0, 3])
def test_an_image_is_seen_in_its_fixed_views(views):
    decoder = _decoder(views)
    seen = {key: set() for key in ("a", "b")}
    for epoch in range(12):
        decoder.reseed(f"run-epoch-{epoch}")
        for key in seen:
            sample = {"__key__": key, "__url__": "shard-0.tar", "png": _png(ord(key)), "txt": b"a thing"}
            seen[key].add(decoder(sample)[0].numpy().tobytes())
    if views:
        assert all(len(s) == views for s in seen.values())
    else:
        assert all(len(s) > 3 for s in seen.values())


def test_the_cache_needs_a_frozen_tower():
    with pytest.raises(ConfigError, match="feature_cache"):
        check_train_config(TrainConfig(objective="caption", init="x", feature_cache="memory", steps=1,
                                       eval_task="none"))
    with pytest.raises(ConfigError, match="feature_cache"):
        check_train_config(TrainConfig(feature_cache="memory", steps=1, eval_task="none"))
    with pytest.raises(ConfigError, match="views"):
        check_train_config(TrainConfig(augment=AugmentConfig(views=-1), steps=1, eval_task="none"))
