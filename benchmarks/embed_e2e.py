"""Embedding a folder of JPEGs end to end (read, decode, resize, model), ViT-B-32 @ 224, same
weights: clipper's `embed` at each `--precision` (fp32, int8, and bf16 on a CPU with native bf16)
vs open_clip's standard path (its `preprocess` in a DataLoader with the same number of workers,
then `encode_image`), 2 threads.

The JPEGs are Fashion-MNIST test images upscaled to 256 px (RGB, quality 90), generated once into
data/cache/embed_e2e/. Also: the int8 model's zero-shot top-1 on the Fashion-MNIST test shards
against fp32, for a trained model (default: the run recorded by train_fmnist.py).

    python benchmarks/embed_e2e.py [--images 2000] [--workers 1] [--precision fp32,int8,bf16] [--fmnist-model DIR]
    python benchmarks/embed_e2e.py --scale-out 2 [--precision bf16]  # only: 1 process x 2 threads vs torchrun 2 x 1

--scale-out N: the same folder and weights through `clipper embed` in one process (2 threads) and
through `torchrun --nproc_per_node N -m clipper embed` (one thread per rank, one shared output
folder), each timed from start to joined output, the outputs compared row by row, at the first
precision named (fp32 by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from clipper.presets import preset  # noqa: E402
from clipper.embed_dir import embed_folder  # noqa: E402
from clipper.interop.open_clip import from_open_clip_state_dict  # noqa: E402
from clipper.precision import native_bf16, with_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(n: int) -> Path:
    from clipper.data.fashion_mnist import load_split

    folder = ROOT / "data" / "cache" / "embed_e2e" / f"fmnist-256-{n}"
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_split("test")
    for i in range(n):
        im = Image.fromarray(images[i % len(images)]).convert("RGB").resize((256, 256), Image.BICUBIC)
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


class Files(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]))


@torch.inference_mode()
def open_clip_embed(model, preprocess, paths, batch, workers) -> np.ndarray:
    loader = DataLoader(Files(paths, preprocess), batch_size=batch, num_workers=workers)
    return torch.cat([model.encode_image(x, normalize=True) for x in loader]).numpy()


def clipper_embed(model, folder: Path, batch: int, workers: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as out:
        embed_folder(model, "bench", folder, out, dtype="float32", batch_size=batch, workers=workers, progress=False)
        return np.load(Path(out) / "img_emb.npy")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def int8_accuracy(model_dir: Path) -> dict:
    from clipper.factory import load_model
    from clipper.evaluate import evaluate_task

    shards = ROOT / "data" / "shards" / "fmnist" / "test"
    model = load_model(model_dir)
    fp32 = evaluate_task(model, "zeroshot-fmnist", str(shards))["top1"]
    int8 = evaluate_task(with_precision(model, "int8"), "zeroshot-fmnist", str(shards))["top1"]
    return {"model": str(model_dir.relative_to(ROOT)), "fp32_top1": round(fp32, 2), "int8_top1": round(int8, 2),
            "drop_points": round(fp32 - int8, 2)}


def scale_out(model, folder: Path, processes: int, batch: int, precision: str) -> dict:
    import os
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "model")
        common = [str(folder), "--model", str(Path(tmp) / "model"), "--dtype", "float32", "--batch-size", str(batch),
                  "--precision", precision]
        runs = {"1_process_2_threads": ([sys.executable, "-m", "clipper.cli", "embed", *common, "--workers", "1"],
                                        {"OMP_NUM_THREADS": "2"}),
                f"torchrun_{processes}_processes_1_thread": (
                    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "-m", "clipper", "embed", *common, "--workers", "0"], {"OMP_NUM_THREADS": "1"})}
        out, seconds = {}, {}
        for name, (cmd, env) in runs.items():
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--out", str(Path(tmp) / name)], check=True, env={**os.environ, **env},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds[name] = time.perf_counter() - t0
            out[name] = (np.load(Path(tmp) / name / "img_emb.npy"), (Path(tmp) / name / "ids.jsonl").read_text())
            print(f"{name:32s} {len(list(folder.glob('*.jpg'))) / seconds[name]:7.2f} images/s (with start-up)",
                  flush=True)
        (a, ids_a), (b, ids_b) = out.values()
        n = len(list(folder.glob("*.jpg")))
        return {"images": n, "precision": precision,
                "images_per_s_with_start_up": {k: round(n / v, 2) for k, v in seconds.items()},
                "ids_identical": ids_a == ids_b, "vectors_max_abs_diff": float(np.abs(a - b).max()),
                "vectors_identical": bool(np.array_equal(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fmnist-model", help="trained fmnist-tiny model directory for the int8 accuracy check")
    ap.add_argument("--scale-out", type=int, metavar="N", help="only the scale-out comparison, N processes")
    ap.add_argument("--precision", default="fp32,int8,bf16",
                    help="clipper's precisions, comma-separated (bf16 only where native)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = make_jpegs(args.images)
    paths = sorted(folder.glob("*.jpg"))

    torch.manual_seed(0)
    oc, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    oc.eval()
    ours = from_open_clip_state_dict(oc.state_dict(), preset("ViT-B-32")).eval()
    precisions = args.precision.split(",")
    if "bf16" in precisions and not native_bf16("cpu"):
        print("embed_e2e: no native bf16 on this CPU: bf16 is left out (clipper refuses it here)", flush=True)
        precisions.remove("bf16")
    if args.scale_out:
        results = scale_out(ours, folder, args.scale_out, args.batch, precisions[0])
        print(json.dumps(results, indent=1))
        print("wrote", write_results("embed_e2e_scale_out" + ("" if precisions[0] == "fp32" else f"_{precisions[0]}"),
                                     results))
        return

    runs = {"open_clip": lambda: open_clip_embed(oc, preprocess, paths, args.batch, args.workers)}
    for p in precisions:  # each its own copy: bf16 is set on the model it is given
        model = with_precision(copy.deepcopy(ours), p)
        runs[f"clipper_{p}"] = lambda model=model: clipper_embed(model, folder, args.batch, args.workers)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    vectors = {}
    for _ in range(args.repeats):  # alternate, so that machine noise hits all alike
        for name, fn in runs.items():
            vectors[name], s = timed(fn)
            seconds[name].append(s)
            print(f"{name:14s} {len(paths) / s:7.2f} images/s", flush=True)
    rate = {k: round(len(paths) / float(np.median(v)), 2) for k, v in seconds.items()}
    results = {
        "model": "ViT-B-32", "images": len(paths), "workers": args.workers, "batch": args.batch,
        "repeats": args.repeats, "images_per_s": rate,
        **{f"ratio_{p}": round(rate[f"clipper_{p}"] / rate["open_clip"], 3) for p in precisions},
        **{f"{p}_min_cosine_vs_open_clip": float((vectors["open_clip"] * vectors[f"clipper_{p}"]).sum(1).min())
           for p in precisions},
    }
    if "clipper_fp32" in vectors:
        diff = np.abs(vectors["open_clip"] - vectors["clipper_fp32"])
        results["fp32_max_abs_diff_vs_open_clip"] = float(diff.max())
    model_dir = args.fmnist_model
    if model_dir is None and (ROOT / "benchmarks" / "results" / "train_fmnist.json").is_file():
        model_dir = ROOT / json.loads((ROOT / "benchmarks" / "results" / "train_fmnist.json").read_text())["run"] / "model"
    if model_dir is not None and Path(model_dir).is_dir():
        results["int8_fmnist_zero_shot"] = int8_accuracy(Path(model_dir).resolve())
        print(results["int8_fmnist_zero_shot"], flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "int8_fmnist_zero_shot"}, indent=1))
    print("wrote", write_results("embed_e2e", results))


if __name__ == "__main__":
    main()
