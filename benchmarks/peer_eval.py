"""The independent evaluator on clipper's exports: a model's zero-shot accuracy from `clipper eval`,
then from clip_benchmark, which loads the model clipper exported for open_clip
(`open_clip.create_model_and_transforms("local-dir:DIR")`) and reads the set clipper exported in
its webdataset layout. The two must agree.

    python benchmarks/peer_eval.py --model runs/.../fmnist/model --data data/shards/fmnist/test

The shards must be labelled (classnames.txt beside them: `clipper data fashion-mnist`, or own
data made with --classes-from-folders / --label-column); their templates.txt is used by both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import clipper
from clipper.cli import main as clipper_main
from clipper.data.clip_benchmark import export_clip_benchmark
from clipper.evaluate import evaluate_task

from common import write_results


def run(model_dir: str, data: str, name: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="peer-eval-"))
    try:
        t0 = time.perf_counter()
        ours = evaluate_task(clipper.load(model_dir), "zeroshot", data)
        ours_s = time.perf_counter() - t0
        clipper_main(["convert", "--model", model_dir, "--to", "open_clip", "--out", str(work / "oc")])
        exported = export_clip_benchmark(data, work / "cb")
        peers = {}
        # fp32, as clipper evaluates; and clip_benchmark's default, mixed precision (bf16 on a CPU)
        for label, flags in (("clip_benchmark_fp32", ["--no_amp"]), ("clip_benchmark_amp", [])):
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "clip_benchmark"), "eval", "--model_type", "open_clip",
                            "--model", f"local-dir:{work / 'oc'}", "--dataset", f"wds/{name}", "--dataset_root",
                            str(work / "cb"), "--task", "zeroshot_classification", "--batch_size", "500",
                            "--num_workers", "0", "--output", str(work / "cb.json"), *flags],
                           check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            theirs = json.loads((work / "cb.json").read_text())["metrics"]
            peers[label] = {"top1": 100 * theirs["acc1"], "mean_per_class_recall": 100 * theirs["mean_per_class_recall"],
                            "seconds": round(time.perf_counter() - t0, 1),
                            "top1_difference": abs(ours["top1"] - 100 * theirs["acc1"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": model_dir, "data": data, "samples": exported["samples"],
            "clipper": {"top1": ours["top1"], "mean_per_class_recall": ours["mean_per_class_recall"],
                        "seconds": round(ours_s, 1)}, **peers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="clipper model directory")
    ap.add_argument("--data", required=True, help="labelled eval shards (classnames.txt beside them)")
    ap.add_argument("--name", default="fmnist", help="results name: benchmarks/results/peer_eval_NAME.json")
    args = ap.parse_args()
    result = run(args.model, args.data, args.name)
    print(json.dumps(result, indent=1))
    print(f"wrote {write_results(f'peer_eval_{args.name}', result)}")


if __name__ == "__main__":
    main()
