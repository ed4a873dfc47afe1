"""kill -9 at random points: `clipper train` (with checkpoints) and `clipper embed` are killed again
and again, resumed each time, and must end with exactly the output of a run never killed: the
same weights and embeddings, every step logged once, no temporary files left. Writes
results/faults.json.

    python benchmarks/faults.py [--kills 50] [--seed 0] [--only train|embed|embed-shared]

embed-shared: two processes share one output (--part 0/2 and 1/2); the second is killed a fifth
as often as the others and restarted.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from clipper.data.samples import Sample  # noqa: E402
from clipper.data.shards import write_shards  # noqa: E402

TINY = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
        "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}


def _run(args: list[str], kill_after: float | None) -> int:
    """Run `python -m clipper ARGS`; SIGKILL it after `kill_after` seconds if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "clipper", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return -9
    if proc.returncode != 0:
        raise RuntimeError(f"clipper {' '.join(args[:2])} failed: {proc.stderr.read()[-2000:]}")
    return 0


def _kill_repeatedly(args: Callable[[], list[str]], finished: Callable[[], bool], kills: int,
                     window: tuple[float, float], rng: random.Random) -> tuple[int, float]:
    """Start `args()` and SIGKILL it a random time in `window` seconds later, `kills` times or until
    it finishes first; then run it to the end. (kills made, wall seconds)"""
    killed, t0 = 0, time.perf_counter()
    for _ in range(kills):
        killed += _run(args(), rng.uniform(*window)) == -9
        if finished():
            break
    _run(args(), None)
    return killed, time.perf_counter() - t0


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith((".tmp", ".old-", ".parts-done", ".partial-")) or p.suffix == ".tmp")


def train_faults(tmp: Path, kills: int, rng: random.Random) -> dict:
    data = tmp / "shards"
    images = np.random.default_rng(0).integers(0, 255, (256, 16, 16, 3), dtype=np.uint8)
    write_shards([Sample(key=f"k{i:04d}", image=images[i], text=f"a picture of class {i % 4}") for i in range(256)],
                 data, samples_per_shard=64)
    (tmp / "tiny.json").write_text(json.dumps(TINY))
    args = ["train", "--model", str(tmp / "tiny.json"), "--train-data", str(data), "--steps", "600",
            "--batch-size", "16", "--workers", "0", "--eval-task", "none", "--set", "minutes=null",
            "--set", "checkpoint_every=5", "--set", "keep_checkpoints=1", "--set", "log_every=5",
            "--set", "warmup_steps=5"]
    _run([*args, "--out", str(tmp / "straight")], None)
    run = tmp / "killed"
    killed, wall = _kill_repeatedly(  # the start-up takes ~3 s of each window
        lambda: [*args, "--out", str(run), *(["--resume"] if list((run / "checkpoints").glob("step-*")) else [])],
        lambda: (run / "model" / "model.safetensors").is_file(), kills, (3.5, 6.0), rng)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip() and "loss" in json.loads(line)]
    same = (run / "model" / "model.safetensors").read_bytes() == (tmp / "straight" / "model" / "model.safetensors").read_bytes()
    return {"kills": killed, "wall_s": round(wall, 1), "weights_equal_straight_run": same,
            "steps_logged_once": steps == list(range(5, 601, 5)), "leftovers": _leftovers(run)}


def embed_setup(tmp: Path, images: int) -> list[str]:
    """`images` PNGs, a model, the straight run's output in tmp/straight-emb; the embed arguments."""
    import clipper

    folder = tmp / "images"
    folder.mkdir()
    rng_pixels = np.random.default_rng(1)
    for i in range(images):
        Image.fromarray(rng_pixels.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    # a larger image tower than TINY's, so that the run lasts long enough for the kills
    config = clipper.ModelConfig.from_dict(TINY | {"vision": {"image_size": 32, "patch_size": 4, "width": 128,
                                                              "layers": 4, "heads": 4}})
    clipper.CLIP(config).save(tmp / "model")
    args = ["embed", str(folder), "--model", str(tmp / "model"), "--workers", "0", "--part-size", "50",
            "--batch-size", "16"]
    _run([*args, "--out", str(tmp / "straight-emb")], None)
    return args


def _compare_embedding(out: Path, straight: Path) -> dict:
    same = all((out / name).read_bytes() == (straight / name).read_bytes()
               for name in ("img_emb.npy", "ids.jsonl", "skipped.jsonl"))
    ids = [json.loads(line)["id"] for line in (out / "ids.jsonl").read_text().splitlines()]
    return {"output_equals_straight_run": same, "rows": len(ids), "duplicates": len(ids) - len(set(ids)),
            "leftovers": _leftovers(out) + (["parts/"] if (out / "parts").exists() else [])}


def embed_faults(tmp: Path, args: list[str], kills: int, rng: random.Random) -> dict:
    out = tmp / "killed-emb"
    killed, wall = _kill_repeatedly(lambda: [*args, "--out", str(out)],
                                    lambda: (out / "embed.json").is_file() and not (out / "parts").exists(),
                                    kills, (3.0, 4.5), rng)
    return {"kills": killed, "wall_s": round(wall, 1), **_compare_embedding(out, tmp / "straight-emb")}


def shared_embed_faults(tmp: Path, args: list[str], kills: int, rng: random.Random) -> dict:
    """Two processes share one output folder (--part 0/2 and 1/2, as two SLURM tasks would): the
    first runs undisturbed, the second is killed and restarted; whichever finishes last joins."""
    out = tmp / "shared-emb"
    first = subprocess.Popen([sys.executable, "-m", "clipper", *args, "--out", str(out), "--part", "0/2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, wall = _kill_repeatedly(lambda: [*args, "--out", str(out), "--part", "1/2"],
                                    lambda: (out / "embed.json").is_file(), kills, (3.0, 4.5), rng)
    if first.wait() != 0:
        raise RuntimeError(f"clipper embed --part 0/2 failed: {first.stderr.read()[-2000:]}")
    if not (out / "embed.json").is_file():  # the first finished last while the second was down: rerun joins
        _run([*args, "--out", str(out), "--part", "1/2"], None)
    return {"kills": killed, "wall_s": round(wall, 1), **_compare_embedding(out, tmp / "straight-emb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["train", "embed", "embed-shared"], help="run one scenario")
    ap.add_argument("--images", type=int, default=20000, help="images of the embed scenarios")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "train"):
            results["train"] = train_faults(tmp, args.kills, rng)
        if args.only != "train":
            embed_args = embed_setup(tmp, args.images)
            if args.only in (None, "embed"):
                results["embed"] = embed_faults(tmp, embed_args, args.kills, rng)
            if args.only in (None, "embed-shared"):
                results["embed_shared"] = shared_embed_faults(tmp, embed_args, max(1, args.kills // 5), rng)
    print(json.dumps(results, indent=2))
    print(f"wrote {write_results('faults' if args.only is None else f'faults_{args.only}', results)}")
    train_ok = "train" not in results or (results["train"]["weights_equal_straight_run"]
                                          and results["train"]["steps_logged_once"] and not results["train"]["leftovers"])
    embed_ok = all(r["output_equals_straight_run"] and not r["duplicates"] and not r["leftovers"]
                   for k, r in results.items() if k != "train")
    sys.exit(0 if train_ok and embed_ok else 1)


if __name__ == "__main__":
    main()
