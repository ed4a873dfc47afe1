"""Shared by train_fmnist.py and train_emoji.py: build the shards if needed, train a preset for a
fixed wall-clock budget through the real CLI, then evaluate every checkpoint (outside the budget)
to get quality against training time."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from clipper.runs import RunDir
from clipper.evaluate import evaluate_task

ROOT = Path(__file__).resolve().parents[1]


def shown(path: str | Path) -> str:
    """`path` as a results file names it: relative to the repository where it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def ensure_shards(name: str) -> Path:
    """data/shards/NAME, built first if needed: fmnist, emoji (Noto) or emoji-styles (every style;
    its train split holds the training styles only)."""
    from clipper.data.build import build_emoji, build_fashion_mnist
    from clipper.data.emoji import STYLES

    out = ROOT / "data" / "shards" / name
    if not (out / "test" / "sizes.json").is_file():
        if name == "fmnist":
            build_fashion_mnist(out)
        else:
            build_emoji(out, **({"styles": STYLES} if name == "emoji-styles" else {}))
    return out


def holdout_split(train: Path, fraction: int = 6) -> tuple[str, str]:
    """(training shards, validation shards): one training pair in `fraction`, chosen by a hash of
    its key (a random sample, like the test split), held out, so that recipe choices are made
    without the test split. A set with several renderings of a thing (json `source_id`) is split
    by that instead, as the test split is: no rendering of a held-out thing is trained on. Written
    once beside the training shards, in `holdout/`."""
    from clipper.data.pipeline import raw_view_of
    from clipper.data.reader import Skip, read_tar
    from clipper.data.shards import SIZES_FILE, add_member

    out = train.parent / "holdout"
    done = out / "val" / SIZES_FILE  # written last; older than the shards: rebuilt from them
    rule = {"fraction": fraction, "hash_of": "source_id, else key"}  # an older rule's split: rebuilt too
    if (done.is_file() and done.stat().st_mtime >= max(t.stat().st_mtime for t in train.glob("*.tar"))
            and (out / "rule.json").is_file() and json.loads((out / "rule.json").read_text()) == rule):
        return str(out / "train"), str(out / "val")
    sizes: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for part in sizes:
        (out / part).mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "val" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as val:
        for shard in sorted(train.glob("*.tar")):
            with tarfile.open(out / "train" / shard.name, "w", format=tarfile.USTAR_FORMAT) as kept:
                for sample in read_tar(str(shard)):
                    if isinstance(sample, Skip):
                        continue
                    key = sample["__key__"]
                    unit = raw_view_of(sample, "source_id") or key
                    held = int(hashlib.sha1(f"holdout-{unit}".encode()).hexdigest(), 16) % fraction == 0
                    tar, part, name = (val, "val", "00000.tar") if held else (kept, "train", shard.name)
                    for ext, data in sample.items():
                        if not ext.startswith("__"):
                            add_member(tar, f"{key}.{ext}", data)
                    sizes[part][name] = sizes[part].get(name, 0) + 1
    (out / "rule.json").write_text(json.dumps(rule) + "\n")
    for part, table in sizes.items():
        (out / part / SIZES_FILE).write_text(json.dumps(table, indent=1) + "\n")
    return str(out / "train"), str(out / "val")


def run_recipe(preset: str, data: str, eval_task: str, minutes: float, checkpoint_every: int,
               extra: list[str], holdout: bool = False, style: str | None = None) -> dict:
    shards = ensure_shards(data)
    train, evaluation = (holdout_split(shards / "train") if holdout else (str(shards / "train"), str(shards / "test")))
    out = ROOT / "runs" / f"bench-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "clipper", "train", "--preset", preset, "--train-data", train,
           "--eval-task", "none", "--minutes", str(minutes), "--out", str(out),
           "--set", f"checkpoint_every={checkpoint_every}", "--set", "keep_checkpoints=1000", *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    run = RunDir(out)
    curve = []
    for ckpt in run.complete_checkpoints():
        model, state = RunDir.load_checkpoint(ckpt)
        metrics = evaluate_task(model, eval_task, evaluation, batch_size=500, style=style)
        curve.append({"step": state["step"], "elapsed_s": round(state["elapsed"], 1), "samples": state["samples"],
                      **{k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}})
        print(json.dumps(curve[-1]), flush=True)
    # every checkpoint was kept for the curve (~80 MB each with the optimizer state); the run
    # folder keeps its final model, metrics and plot
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    logged = [r for r in run.read_metrics() if "samples_per_s" in r]
    return {"preset": preset, "data": data, "style": style, "run": str(out.relative_to(ROOT)), "minutes": minutes,
            "train_data": train, "eval_data": evaluation,
            "evaluated_on": "validation (1 in 6 training pairs, held out)" if holdout else "test split", "wall_s_incl_startup": round(wall, 1),
            "train_config": json.loads((out / "config.json").read_text()),
            "samples_seen": curve[-1]["samples"], "train_seconds": curve[-1]["elapsed_s"],
            "samples_per_s": round(curve[-1]["samples"] / curve[-1]["elapsed_s"], 1),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in logged) if logged else None,
            "final": curve[-1], "curve": curve, "threads": torch.get_num_threads()}


def main(doc: str, preset: str, data: str, eval_task: str, checkpoint_every: int, style: str | None = None) -> dict:
    """The shared command line of the recipe benchmarks: parse, run, return the result."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default=preset, help=f"training preset (default {preset})")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    ap.add_argument("--set", action="append", default=[], help="TrainConfig overrides, as for clipper train")
    ap.add_argument("--holdout", action="store_true",
                    help="recipe work: train without a random sixth of the training pairs and score on it, "
                         "not on the test split")
    args = ap.parse_args()
    return run_recipe(args.preset, data, eval_task, args.minutes, args.checkpoint_every,
                      [x for s in args.set for x in ("--set", s)], args.holdout, style)


def results_name(name: str, result: dict) -> str:
    """Validation runs (--holdout) get their own results file: the table reports the test split."""
    return name if result["evaluated_on"] == "test split" else f"{name}_holdout"
