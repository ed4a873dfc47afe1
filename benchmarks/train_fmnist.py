"""`clipper train --preset fmnist-tiny --minutes 10` on the Fashion-MNIST shards, then zero-shot
top-1 on the 10,000 test images with the EVAL templates, for every checkpoint (quality against
training time: when does it pass open_clip's 88.6%?).

    python benchmarks/train_fmnist.py [--minutes 10] [--set FIELD=VALUE ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from recipe import main, results_name  # noqa: E402

OPEN_CLIP_PEER = {"recipe": "open_clip ViT 4x128 patch 8 @32px, text ctx 16 3x128, 10 min", "samples_per_s": 419,
                  "top1": 88.6}

if __name__ == "__main__":
    result = main(__doc__, "fmnist-tiny", "fmnist", "zeroshot-fmnist", checkpoint_every=250)
    reached = [p for p in result["curve"] if p["top1"] >= OPEN_CLIP_PEER["top1"]]
    result["first_at_or_above_88.6"] = reached[0] if reached else None
    result["open_clip_peer_reported"] = OPEN_CLIP_PEER
    print(f"final top-1 {result['final']['top1']:.2f}% after {result['train_seconds']} s "
          f"({result['samples_per_s']} samples/s); >= 88.6% first at "
          f"{reached[0]['elapsed_s'] if reached else 'never'} s")
    print("wrote", write_results(results_name("train_fmnist", result), result))
