"""A user's first fine-tune: 51 own pairs, default flags, one minute.

A base emoji model trains on the emoji training split without its held-out part (recipe.py's
`holdout_split`) for --base-minutes; 51 pairs of the held-out part are "the user's folder". Then
`python -m clipper train --init BASE --train-data FOLDER --minutes 1 --out RUN` with no other flag,
and retrieval on those 51 pairs before and after, and on the rest of the held-out part (pairs
neither run trained on: what the fine-tune did to everything else).

    python benchmarks/finetune_small.py [--base-minutes 3] [--minutes 1] [--pairs 51]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ROOT, ensure_shards, holdout_split  # noqa: E402

import clipper  # noqa: E402
from clipper.data.reader import Skip, read_tar  # noqa: E402
from clipper.data.shards import SIZES_FILE, add_member  # noqa: E402
from clipper.evaluate import evaluate_task  # noqa: E402
from clipper.finetune import mix_weights  # noqa: E402


def split_folder(val: str, pairs: int, out: Path) -> tuple[str, str]:
    """(the first `pairs` held-out pairs, the others) as two shard folders."""
    counts = {"mine": 0, "rest": 0}
    for part in counts:
        (out / part).mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "mine" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as mine, \
            tarfile.open(out / "rest" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as rest:
        for shard in sorted(Path(val).glob("*.tar")):
            for sample in read_tar(str(shard)):
                if isinstance(sample, Skip):
                    continue
                part = "mine" if counts["mine"] < pairs else "rest"
                for ext, data in sample.items():
                    if not ext.startswith("__"):
                        add_member(mine if part == "mine" else rest, f"{sample['__key__']}.{ext}", data)
                counts[part] += 1
    for part, n in counts.items():
        (out / part / SIZES_FILE).write_text(json.dumps({"00000.tar": n}) + "\n")
    return str(out / "mine"), str(out / "rest")


def train(args: list[str]) -> float:
    cmd = [sys.executable, "-m", "clipper.train", *args]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def retrieval(model: Path | clipper.CLIP, shards: str) -> dict:
    metrics = evaluate_task(clipper.load(model) if isinstance(model, Path) else model, "retrieval", shards)
    return {k: round(v, 2) for k, v in metrics.items() if k.startswith(("t2i", "i2t"))}


def wise_ft_sweep(base: Path, run: Path, mine: str, rest: str, alphas=(0.25, 0.5, 0.75, 1.0)) -> dict:
    """The fine-tuned weights (the run's last checkpoint: the model folder holds the default mix)
    mixed with the base's at each alpha, on both parts."""
    tuned = sorted((run / "checkpoints").glob("step-*"))[-1] / "model"
    start = clipper.load(base / "model").state_dict()
    out = {}
    for alpha in alphas:
        model = clipper.load(tuned)
        mix_weights(model, start, alpha)
        out[str(alpha)] = {"mine": retrieval(model, mine), "rest": retrieval(model, rest)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-minutes", type=float, default=3.0)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--pairs", type=int, default=51)
    args = ap.parse_args()
    train_split, val = holdout_split(ensure_shards("emoji") / "train")
    mine, rest = split_folder(val, args.pairs, ROOT / "data" / "shards" / "emoji" / f"finetune-{args.pairs}")
    with tempfile.TemporaryDirectory(prefix="clipper-finetune-") as tmp:  # two runs' checkpoints: gone after
        results = measure(args, train_split, mine, rest, Path(tmp) / "base", Path(tmp) / "run")
    print(json.dumps(results, indent=1))
    print("wrote", write_results("finetune_small", results))


def measure(args: argparse.Namespace, train_split: str, mine: str, rest: str, base: Path, run: Path) -> dict:
    base_seconds = train(["--preset", "emoji-small", "--train-data", train_split, "--eval-task", "none",
                          "--minutes", str(args.base_minutes), "--out", str(base)])
    seconds = train(["--init", str(base / "model"), "--train-data", mine, "--minutes", str(args.minutes),
                     "--out", str(run)])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    config = json.loads((run / "config.json").read_text())
    results = {"pairs": args.pairs, "base_minutes": args.base_minutes, "finetune_minutes": args.minutes,
               "finetune_flags": "--init BASE --train-data FOLDER --minutes M (nothing else)",
               "finetune_batch_size": config["batch_size"], "finetune_steps": steps[-1]["step"] if steps else 0,
               "finetune_wall_s": round(seconds, 1), "base_wall_s": round(base_seconds, 1),
               "lr_at_step": {str(r["step"]): r["lr"] for r in steps[:3]},
               "mine_before": retrieval(base / "model", mine), "mine_after": retrieval(run / "model", mine),
               "wise_ft_default": config["wise_ft"],
               "rest_before": retrieval(base / "model", rest), "rest_after": retrieval(run / "model", rest),
               "wise_ft_sweep": wise_ft_sweep(base, run, mine, rest)}
    return results


if __name__ == "__main__":
    main()
