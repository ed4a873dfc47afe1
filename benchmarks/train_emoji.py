"""`clipper train --preset emoji-small --minutes 10` on the emoji train split in the training
styles (Noto and Twemoji, each emoji's two renderings as views of one thing), then the protocol
metrics on the 748 Noto test emoji (text->image R@1/R@5, image->text R@1) for every checkpoint,
and for the final model the same on every style's test split (Apple and Facebook: never trained
on), the never-trained styles' val split and image->image across styles.

The final model's t2i R@1 is also split by names with and without a word the training pairs never
hold (benchmarks/emoji_unseen_words.py).

    python benchmarks/train_emoji.py [--preset emoji-small] [--minutes 10] [--holdout] [--set FIELD=VALUE ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from emoji_styles import measure  # noqa: E402
from emoji_unseen_words import unseen_word_split  # noqa: E402
from recipe import ROOT, main, results_name  # noqa: E402

OPEN_CLIP_PEER = {"recipe": "open_clip ViT 4x128 patch 8 @64px, text 3x128, 10 min",
                  "t2i_R@1": 48.3, "t2i_R@5": 61.0, "i2t_R@1": 47.3}

if __name__ == "__main__":
    result = main(__doc__, "emoji-small", "emoji-styles", "retrieval-emoji", checkpoint_every=100, style="noto")
    result["open_clip_peer_reported"] = OPEN_CLIP_PEER
    result["final_by_style"] = measure(ROOT / result["run"] / "model", test=result["evaluated_on"] == "test split")
    import clipper

    result["unseen_words"] = unseen_word_split(clipper.load(ROOT / result["run"] / "model"), result["train_data"],
                                               result["eval_data"], "noto")
    f = result["final"]
    print(f"final Noto t2i R@1 {f['t2i_R@1']:.1f}%  R@5 {f['t2i_R@5']:.1f}%  i2t R@1 {f['i2t_R@1']:.1f}% after "
          f"{result['train_seconds']} s ({result['samples_per_s']} samples/s); unseen-word names "
          f"{result['unseen_words']['t2i_R@1_unseen']:.1f}%, seen {result['unseen_words']['t2i_R@1_seen']:.1f}%")
    print("wrote", write_results(results_name("train_emoji", result), result))
