"""open_clip's own trainer (`open_clip_train.main`, CPU, 2 threads) on the same Fashion-MNIST
shards, for about the same wall-clock budget as clipper's recipe, then the same zero-shot
evaluation (clipper reads its checkpoint through the interop).

Model: the small config issue #4 names as open_clip's best (ViT 4 x 128, patch 8 on 32 px RGB;
text context 16, 3 x 128; embed 128), registered with `open_clip.add_model_config`. open_clip's
trainer has no wall-clock budget, so --epochs is chosen to take about 10 minutes at its measured
rate (about 700 samples/s here: 7 epochs); the time taken is reported. It reads a CSV export of
the shards (see export_csv).

    python benchmarks/open_clip_trainer.py [--epochs 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ROOT, ensure_shards  # noqa: E402

NAME = "fmnist-peer-oc"
CONFIG = {"embed_dim": 128,
          "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8, "head_width": 64},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3}}


def export_csv(shards: Path, out: Path) -> Path:
    """The training shards as PNG files + a TSV (filepath, title): open_clip_train's webdataset
    reader fails on the installed webdataset (KeyError 'fname' in group_by_keys_nothrow), its CSV
    reader works. Same images and captions, in shard order; open_clip shuffles them itself."""
    from clipper.data.reader import list_shards, read_tar

    table = out / "train.tsv"
    if table.is_file():
        return table
    out.mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for shard in list_shards(shards):
        for s in read_tar(shard):
            path = out / f"{s['__key__']}.png"
            path.write_bytes(s["png"])
            rows.append(f"{path}\t{s['txt'].decode().strip()}")
    table.write_text("\n".join(rows) + "\n")
    return table


def run_open_clip(shards: Path, logs: Path, epochs: int, batch: int, lr: float) -> float:
    import open_clip
    from open_clip_train.main import main as train_main

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{NAME}.json").write_text(json.dumps(CONFIG))
        open_clip.add_model_config(d)
    table = export_csv(shards / "train", ROOT / "data" / "cache" / "open_clip_trainer")
    args = ["--model", NAME, "--train-data", str(table), "--dataset-type", "csv",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", str(lr), "--wd", "0.1", "--warmup", "100",
            "--workers", "1", "--device", "cpu", "--precision", "fp32", "--logs", str(logs), "--name", "run",
            "--save-frequency", "1", "--log-every-n-steps", "20", "--seed", "0", "--report-to", ""]
    print("open_clip_train.main", " ".join(args), flush=True)
    t0 = time.time()
    train_main(args)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    shards = ensure_shards("fmnist")
    logs = ROOT / "runs" / f"bench-open-clip-trainer-{time.strftime('%Y%m%d-%H%M%S')}"
    wall = run_open_clip(shards, logs, args.epochs, args.batch, args.lr)

    import clipper
    from clipper.evaluate import evaluate_task

    curve = []
    for ckpt in sorted((logs / "run" / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        model = clipper.load(ckpt)
        metrics = evaluate_task(model, "zeroshot-fmnist", str(shards / "test"), batch_size=500)
        curve.append({"epoch": int(ckpt.stem.split("_")[1]), **{k: round(v, 2) for k, v in metrics.items()}})
        print(json.dumps(curve[-1]), flush=True)
    samples = args.epochs * sum(json.loads((shards / "train" / "sizes.json").read_text()).values())
    result = {"trainer": "open_clip_train.main", "config": CONFIG, "epochs": args.epochs, "batch": args.batch,
              "lr": args.lr, "wall_s_incl_startup": round(wall, 1), "samples_seen": samples,
              "samples_per_s_incl_startup": round(samples / wall, 1), "final": curve[-1], "curve": curve,
              "logs": str(logs.relative_to(ROOT))}
    print(json.dumps(result["final"]))
    print("wrote", write_results("open_clip_trainer", result))


if __name__ == "__main__":
    main()
