"""`clipper train --preset emoji-small --minutes 10` on the emoji train split in the training
styles (Noto and Twemoji, each emoji's two renderings as views of one thing), then the protocol
metrics on the 748 Noto test emoji (text->image R@1/R@5, image->text R@1) for every checkpoint,
and for the final model the same on every style's test split (Apple and Facebook: never trained
on), the never-trained styles' val split and image->image across styles.

    python benchmarks/train_emoji.py [--minutes 10] [--set FIELD=VALUE ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from emoji_styles import measure  # noqa: E402
from recipe import ROOT, main, results_name  # noqa: E402

OPEN_CLIP_PEER = {"recipe": "open_clip ViT 4x128 patch 8 @64px, text 3x128, 10 min",
                  "t2i_R@1": 48.3, "t2i_R@5": 61.0, "i2t_R@1": 47.3}

if __name__ == "__main__":
    result = main(__doc__, "emoji-small", "emoji-styles", "retrieval-emoji", checkpoint_every=100, style="noto")
    result["open_clip_peer_reported"] = OPEN_CLIP_PEER
    result["final_by_style"] = measure(ROOT / result["run"] / "model")
    f = result["final"]
    print(f"final Noto t2i R@1 {f['t2i_R@1']:.1f}%  R@5 {f['t2i_R@5']:.1f}%  i2t R@1 {f['i2t_R@1']:.1f}% after "
          f"{result['train_seconds']} s ({result['samples_per_s']} samples/s)")
    print("wrote", write_results(results_name("train_emoji", result), result))
