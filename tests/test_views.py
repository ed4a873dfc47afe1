"""Views of one thing (issue #18): samples that share a view key (the same emoji drawn by two
artists) travel together through the shuffle into one batch, count as positives of each other in
the contrastive losses, and the image-image loss pulls each towards its other views."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipper.config import ModelConfig
from clipper.train_config import TrainConfig
from clipper.data.pipeline import MAX_VIEWS, ShardDataset, view_units
from clipper.data.reader import Skip
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.errors import ConfigError
from clipper.losses import infonce_loss, sigmoid_loss, view_loss
from clipper.train import Trainer

TINY_RGB = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
            "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}
STYLES = ("flat", "dark")
COLOURS = [(220, 30, 30), (30, 160, 30), (30, 30, 220), (220, 200, 20), (150, 30, 180)]


def _draw(thing: int, style: int) -> np.ndarray:
    """Thing i: a square of one of 5 colours at one of 9 places; the dark style halves the colour
    on a grey ground."""
    im = np.full((16, 16, 3), 190 if style else 255, dtype=np.uint8)
    y, x = (thing % 9) // 3 * 5, (thing % 9) % 3 * 5
    im[y:y + 6, x:x + 6] = np.array(COLOURS[thing // 9]) // (2 if style else 1)
    return im


@pytest.fixture()
def two_style_shards(tmp_path):
    """40 things, each drawn in two styles (next to each other, as `clipper data emoji --styles`
    writes them), 30 samples a shard."""
    samples = [Sample(f"t{i}_{style}", _draw(i, s), f"thing {i}", {"source_id": f"cp{i}", "style": style})
               for i in range(40) for s, style in enumerate(STYLES)]
    write_shards(samples, tmp_path / "train", samples_per_shard=30)
    return tmp_path / "train"


def _raw(key, value=None):
    return {"__key__": key, "__url__": "s.tar", **({"json": json.dumps({"id": value}).encode()} if value else {})}


def test_view_units_group_neighbours_only():
    skip = Skip("s.tar", "bad", "truncated")
    raw = [_raw("a1", "a"), _raw("a2", "a"), _raw("b1", "b"), skip, _raw("b2", "b"), _raw("n1"), _raw("n2"),
           {"__key__": "j", "__url__": "s.tar", "json": b"{not json"}, _raw("a3", "a")]
    units = [[s.key if isinstance(s, Skip) else s["__key__"] for s in u] for u in view_units(iter(raw), "id")]
    # a skip, a sample without the field and a bad json each stand alone; "a" twice, not joined
    assert units == [["a1", "a2"], ["b1"], ["bad"], ["b2"], ["n1"], ["n2"], ["j"], ["a3"]]
    many = [_raw(f"x{i}", "x") for i in range(2 * MAX_VIEWS + 1)]
    assert [len(u) for u in view_units(iter(many), "id")] == [MAX_VIEWS, MAX_VIEWS, 1]


@pytest.mark.parametrize("view_key", ["source_id", "caption"])
def test_the_views_of_a_thing_share_a_batch_and_a_group(two_style_shards, view_key):
    config = ModelConfig.from_dict(TINY_RGB)
    data = ShardDataset(two_style_shards, config, batch_size=16, seed=5, shuffle_buffer=50, view_key=view_key)
    seen = []
    for batch in data:
        metas, groups = batch["meta"], batch["group"].tolist()
        by_group = Counter(groups)
        assert set(by_group.values()) == {2}  # both views of every thing in the batch
        for g in by_group:
            pair = [m for m, gi in zip(metas, groups) if gi == g]
            assert pair[0]["source_id"] == pair[1]["source_id"] and {m["style"] for m in pair} == set(STYLES)
        seen += [m["source_id"] for m in metas]
    assert len(set(seen)) == len(seen) // 2 == 40  # one pass, each thing once in each style
    assert seen[::2] != [f"cp{i}" for i in range(40)]  # shuffled, as units
    plain = next(iter(ShardDataset(two_style_shards, config, batch_size=16, seed=5, shuffle_buffer=50)))
    assert "group" not in plain


def test_a_folder_with_several_photos_per_caption(tmp_path):
    """A user's folder (`clipper data folder`): each thing's photos side by side in its folder,
    captioned alike, are one thing's views with view_key=caption."""
    from PIL import Image

    from clipper.data.sources import folder_samples

    for i in range(6):
        for s in range(2):
            (tmp_path / "photos" / f"thing{i}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_draw(i, s)).save(tmp_path / "photos" / f"thing{i}" / f"{s}.png")
            (tmp_path / "photos" / f"thing{i}" / f"{s}.txt").write_text(f"a photo of thing {i}\n")
    write_shards(folder_samples(tmp_path / "photos"), tmp_path / "shards")
    batch = next(iter(ShardDataset(tmp_path / "shards", ModelConfig.from_dict(TINY_RGB), batch_size=12,
                                   shuffle_buffer=50, view_key="caption")))
    by_caption = {}
    for caption, group in zip(batch["caption"], batch["group"].tolist()):
        by_caption.setdefault(caption, set()).add(group)
    assert len(by_caption) == 6 and all(len(g) == 1 for g in by_caption.values())
    assert Counter(batch["group"].tolist()).most_common()[-1][1] == 2


def test_a_group_makes_positives_like_a_shared_caption():
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(5.0)
    groups = torch.tensor([7, 1, 7, 3])
    logits = scale * img @ txt.T
    target = torch.tensor([[.5, 0, .5, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 1]])
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(infonce_loss(img, txt, scale, groups=groups)["loss"], expected)
    labels = 2 * (target > 0).float() - 1
    assert torch.allclose(sigmoid_loss(img, txt, scale, torch.tensor(-1.0), groups=groups)["loss"],
                          -F.logsigmoid(labels * (logits - 1)).sum() / 4)


def test_view_loss_pulls_each_image_to_its_other_views():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    scale = torch.tensor(4.0)
    groups = torch.tensor([0, 0, 1, 2, 2])  # image 2 has no other view: it adds no term
    logits = (scale * img @ img.T).fill_diagonal_(float("-inf")).log_softmax(1)
    expected = -(logits[0, 1] + logits[1, 0] + logits[3, 4] + logits[4, 3]) / 4
    loss = view_loss(img, scale, groups)
    assert torch.allclose(loss, expected)
    loss.backward()
    closer = F.normalize(img.detach() - 0.1 * img.grad, dim=-1)  # a step down the gradient
    assert (closer[0] @ closer[1]) > (img[0] @ img[1]).detach()
    alone = view_loss(img, scale, torch.arange(5))
    assert alone.item() == 0.0 and alone.requires_grad


def test_training_with_views_lowers_the_view_loss(two_style_shards, tmp_path, monkeypatch):
    from clipper import presets

    monkeypatch.setitem(presets._PRESETS, "rgb-tiny", TINY_RGB)
    cfg = TrainConfig(model="rgb-tiny", train_data=str(two_style_shards), batch_size=16, lr=3e-3, warmup_steps=2,
                      steps=24, workers=0, log_every=4, seed=3, shuffle_buffer=50, view_key="source_id",
                      view_weight=1.0, same_caption_positive=True)
    Trainer(cfg, tmp_path / "run").fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    views = [r["view_loss"] for r in logged if "view_loss" in r]
    assert len(views) == 6 and views[-1] < views[0] / 2
    with pytest.raises(ConfigError, match="view_weight: needs view_key"):
        TrainConfig(train_data="x", steps=1, view_weight=1.0).validate()


def test_the_validation_split_keeps_a_things_renderings_together(two_style_shards, monkeypatch):
    from pathlib import Path

    from clipper.data.reader import read_tar

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from recipe import holdout_split

    def things(part: str) -> Counter:
        return Counter(json.loads(s["json"])["source_id"] for shard in sorted(Path(part).glob("*.tar"))
                       for s in read_tar(str(shard)))

    things = [things(part) for part in holdout_split(two_style_shards, fraction=4)]
    assert things[0] and things[1] and not set(things[0]) & set(things[1])  # each thing on one side only
    assert set(things[0].values()) == set(things[1].values()) == {2}  # with both its renderings
    assert sum(things[0].values()) + sum(things[1].values()) == 80


def test_swapped_patches_trade_places_within_a_pair_only():
    from clipper.view_mix import swap_view_patches

    torch.manual_seed(0)
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()
    groups = torch.tensor([4, 7, 4, 9, 7, 1])  # pairs (0, 2) and (1, 4); 3 and 5 alone
    assert torch.equal(swap_view_patches(images, groups, 0.0), images)
    torch.manual_seed(1)
    out = swap_view_patches(images, groups, 1.0)
    torch.manual_seed(1)
    assert torch.equal(swap_view_patches(images, groups, 1.0), out)  # seeded
    assert torch.equal(out[[3, 5]], images[[3, 5]])
    for i, j in ((0, 2), (2, 0), (1, 4), (4, 1)):
        taken = out[i] == j  # the partner's pixels, in one rectangle at the same place in both
        share = taken[0].float().mean()
        assert 0.2 <= share <= 0.55 and torch.equal(taken, out[j] == i)
        assert ((out[i] == i) | taken).all()
        rows, cols = taken[0].any(1).nonzero().flatten(), taken[0].any(0).nonzero().flatten()
        assert taken[0].sum() == len(rows) * len(cols)  # a rectangle
    with pytest.raises(ConfigError, match="view_swap: needs view_key"):
        TrainConfig(train_data="x", steps=1, view_swap=0.5).validate()
