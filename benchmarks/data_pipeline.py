"""Training pipeline alone (read shards, decode, augment, tokenise, batch): samples/s with 0, 1
and 2 DataLoader workers on the Fashion-MNIST and emoji shards (decoded images cached, as after
the first pass of a run; and with no worker and no cache), next to the training step alone
(forward, backward, AdamW on a fixed batch) of the preset that trains on them. The pipeline must
not be the bottleneck: the ratio pipeline/step should stay well above 1.

    python benchmarks/data_pipeline.py [--batches 30]
    python benchmarks/data_pipeline.py --only emoji --set augment.rotate=10 ... --name data_pipeline_views
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ensure_shards  # noqa: E402

from clipper.presets import preset  # noqa: E402
from clipper.run_config import merge_train_config  # noqa: E402
from clipper.train_config import train_preset  # noqa: E402
from clipper.data.pipeline import ShardDataset, make_loader, training_dataset  # noqa: E402
from clipper.losses import infonce_loss  # noqa: E402
from clipper.model import CLIP  # noqa: E402
from clipper.objectives import contrastive_forward_backward  # noqa: E402
from clipper.precision import autocast as autocast_rule  # noqa: E402


def pipeline_rate(shards: Path, model_preset: str, batch: int, workers: int, batches: int, cache: bool,
                  sets: list[str]) -> float:
    """Samples/s of the preset's training pipeline (its augmentation and captions, its decoded-image
    cache or none; `sets`: TrainConfig overrides, e.g. the style views), measured after one pass
    over the set: the state of most of a run."""
    cfg = dataclasses.replace(merge_train_config(model_preset, None, {"eval_task": "none"}, sets), train_data=str(shards),
                              batch_size=batch, min_epoch_batches=10**9)  # one endless epoch
    if not cache:
        cfg.decoded_cache_mb = 0
    ds = training_dataset(cfg, preset(model_preset), rank=0, world=1)
    it = iter(make_loader(ds, workers))
    for _ in range(ds.num_samples // (batch * max(1, workers)) + 2):
        next(it)  # worker start-up and the first pass (filling the caches) are not throughput
    t0 = time.perf_counter()
    n = 0
    for _, b in zip(range(batches), it):
        n += len(b["key"])
    return n / (time.perf_counter() - t0)


def step_rate(shards: Path, model_preset: str, batch: int, steps: int) -> float:
    """The training preset's step alone (its precision, fused AdamW) on one batch."""
    torch.manual_seed(0)
    cfg = train_preset(model_preset)
    model = CLIP(preset(model_preset)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ds = ShardDataset(shards, model.config, batch, train=True, rank=0, world=1)
    b = next(iter(make_loader(ds, 0)))
    autocast = functools.partial(autocast_rule, cfg.precision, torch.device("cpu"))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        contrastive_forward_backward(model, b["image"], b["text"], infonce_loss, autocast=autocast,
                                     same_caption_positive=cfg.same_caption_positive)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=["fmnist", "emoji"], default=["fmnist", "emoji"])
    ap.add_argument("--set", action="append", default=[], help="TrainConfig overrides for the pipelines")
    ap.add_argument("--name", default="data_pipeline", help="results name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"overrides": args.set}
    for data, model_preset in (("fmnist", "fmnist-tiny"), ("emoji", "emoji-small")):
        if data not in args.only:
            continue
        shards = ensure_shards(data) / "train"
        batch = train_preset(model_preset).batch_size
        row = {f"pipeline_{w}_workers": round(pipeline_rate(shards, model_preset, batch, w, args.batches, True,
                                                            args.set), 1) for w in (0, 1, 2)}
        row["pipeline_0_workers_no_cache"] = round(pipeline_rate(shards, model_preset, batch, 0, args.batches,
                                                                 False, args.set), 1)
        row["train_step_only"] = round(step_rate(shards, model_preset, batch, 10), 1)
        row["ratio_pipeline0_to_step"] = round(row["pipeline_0_workers"] / row["train_step_only"], 2)
        results[data] = {"preset": model_preset, "batch": batch, "samples_per_s": row}
        print(data, row, flush=True)
    print("wrote", write_results(args.name, results))


if __name__ == "__main__":
    main()
