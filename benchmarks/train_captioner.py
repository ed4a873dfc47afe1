"""Captioner training for a fixed wall-clock budget on 2 cores (image tower frozen), then the
captioning metrics of the test split: `--data emoji` (exact match, BLEU-4, ROUGE-L, CIDEr-D
against the tts names) or `--data fmnist` (the share of captions naming the right class).

    python benchmarks/train_captioner.py --data emoji [--minutes 10] [--init MODEL_DIR]

--init defaults to the contrastive model of the latest train_emoji.py / train_fmnist.py run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import ROOT, run_recipe, shown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["emoji", "fmnist"], required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--init", help="contrastive model directory")
    ap.add_argument("--set", action="append", default=[], help="TrainConfig overrides, as for clipper train")
    args = ap.parse_args()
    init = args.init
    if init is None:
        run = json.loads((ROOT / "benchmarks" / "results" / f"train_{args.data}.json").read_text())["run"]
        init = str(ROOT / run / "model")
    task = "captioning-emoji" if args.data == "emoji" else "captioning-fmnist"
    # One checkpoint at the end: generating captions for the test split is the slow part.
    result = run_recipe(f"{args.data}-captioner", args.data, task, args.minutes, 10 ** 9,
                        ["--init", init, *[x for s in args.set for x in ("--set", s)]])
    result["init"] = shown(init)
    print(json.dumps(result["final"], indent=1))
    print("wrote", write_results(f"train_captioner_{args.data}", result))


if __name__ == "__main__":
    main()
