"""kill -9 at random points: `clipper train` (with checkpoints) and `clipper embed` are killed again
and again, resumed each time, and must end with exactly the output of a run never killed: the
same weights and embeddings, every step logged once, no temporary files left. Writes
results/faults.json.

    python benchmarks/faults.py [--kills 50] [--seed 0]
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
    """Run `python -m clipper.cli ARGS`; SIGKILL it after `kill_after` seconds if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "clipper.cli", *args], stdout=subprocess.DEVNULL,
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


def embed_faults(tmp: Path, kills: int, rng: random.Random) -> dict:
    import clipper

    folder = tmp / "images"
    folder.mkdir()
    rng_pixels = np.random.default_rng(1)
    for i in range(20000):
        Image.fromarray(rng_pixels.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    # a larger image tower than TINY's, so that the run lasts long enough for the kills
    config = clipper.ModelConfig.from_dict(TINY | {"vision": {"image_size": 32, "patch_size": 4, "width": 128,
                                                              "layers": 4, "heads": 4}})
    clipper.CLIP(config).save(tmp / "model")
    args = ["embed", str(folder), "--model", str(tmp / "model"), "--workers", "0", "--part-size", "50",
            "--batch-size", "16"]
    _run([*args, "--out", str(tmp / "straight-emb")], None)
    out = tmp / "killed-emb"
    killed, wall = _kill_repeatedly(lambda: [*args, "--out", str(out)],
                                    lambda: (out / "embed.json").is_file() and not (out / "parts").exists(),
                                    kills, (3.0, 4.5), rng)
    same = all((out / name).read_bytes() == (tmp / "straight-emb" / name).read_bytes()
               for name in ("img_emb.npy", "ids.jsonl", "skipped.jsonl"))
    ids = [json.loads(line)["id"] for line in (out / "ids.jsonl").read_text().splitlines()]
    return {"kills": killed, "wall_s": round(wall, 1), "output_equals_straight_run": same,
            "rows": len(ids), "duplicates": len(ids) - len(set(ids)),
            "leftovers": _leftovers(out) + (["parts/"] if (out / "parts").exists() else [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"train": train_faults(Path(tmp), args.kills, rng), "embed": embed_faults(Path(tmp), args.kills, rng)}
    print(json.dumps(results, indent=2))
    print(f"wrote {write_results('faults', results)}")
    ok = results["train"]["weights_equal_straight_run"] and results["train"]["steps_logged_once"] and \
        results["embed"]["output_equals_straight_run"] and not results["embed"]["duplicates"] and \
        not results["train"]["leftovers"] and not results["embed"]["leftovers"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
