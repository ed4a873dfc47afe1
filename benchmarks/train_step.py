"""Contrastive training step: clipper vs open_clip (its CLIP + ClipLoss + AdamW) at one identical
config, same initial weights, same batch, 2 threads, in one run. Reports samples/s each and the
ratio, the first-step loss of each, and (in separate processes) the peak RSS of each.

Config (issue #4): ViT 6 layers x 192 on 32 px with patch 4; text context 32, 4 layers x 192;
embed 128; batch 256; AdamW. Captions are drawn as in the Fashion-MNIST training shards (random
TRAIN template, random class).

    python benchmarks/train_step.py [--steps 8] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates, write_results  # noqa: E402

from clipper.distributed import peak_rss_mib  # noqa: E402

VISION = {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64}
TEXT = {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4}


def build(batch: int, only: str | None = None, device: str = "cpu", bf16: bool = False):
    """The two step functions (open_clip, clipper) on the same weights and batch; `bf16`: autocast."""
    import contextlib

    import open_clip
    from open_clip.loss import ClipLoss

    from clipper.presets import from_open_clip_config
    from clipper.data.fashion_mnist import CLASSES, TRAIN_TEMPLATES
    from clipper.interop.open_clip import from_open_clip_state_dict
    from clipper.losses import infonce_loss
    from clipper.tokenizer import Tokenizer

    torch.manual_seed(0)
    oc = open_clip.CLIP(embed_dim=128, vision_cfg=VISION, text_cfg=TEXT).train()
    ours = from_open_clip_state_dict(oc.state_dict(), from_open_clip_config(
        "bench", {"embed_dim": 128, "vision_cfg": VISION, "text_cfg": TEXT})).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    # Captions as the Fashion-MNIST shards hold them: a random TRAIN template and a random class
    # (about 100 distinct captions in 256; clipper encodes each distinct caption once).
    picks = torch.randint(0, 10, (batch, 2), generator=g).tolist()
    captions = [TRAIN_TEMPLATES[t].format(CLASSES[c]) for t, c in picks]
    texts = Tokenizer(32)(captions)
    oc, ours, images, texts = oc.to(device), ours.to(device), images.to(device), texts.to(device)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    if only == "clipper":
        del oc  # measure clipper's memory alone
    elif only == "open_clip":
        del ours
    oc_loss = ClipLoss()
    opt_oc = torch.optim.AdamW(oc.parameters(), lr=1e-4, weight_decay=0.1) if only != "clipper" else None
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1) if only != "open_clip" else None

    def step_open_clip():
        with autocast():
            out = oc(images, texts)
            loss = oc_loss(out["image_features"] if isinstance(out, dict) else out[0],
                           out["text_features"] if isinstance(out, dict) else out[1],
                           out["logit_scale"] if isinstance(out, dict) else out[2])
        loss.backward()
        opt_oc.step()
        opt_oc.zero_grad(set_to_none=True)
        return loss.item()

    def step_clipper():
        with autocast():
            out = ours(images, texts)
            loss = infonce_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"])["loss"]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    step_open_clip.distinct_captions = len(set(captions))
    return step_open_clip, step_clipper


def peak_rss(which: str, batch: int, steps: int, threads: int, precision: str) -> float:
    """Peak RSS (MiB) of a fresh process running `steps` training steps of one framework alone."""
    out = subprocess.run([sys.executable, __file__, "--only", which, "--batch", str(batch), "--steps", str(steps),
                          "--threads", str(threads), "--precision", precision], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: both under CPU bf16 autocast (results/train_step_bf16.json)")
    ap.add_argument("--only", choices=["open_clip", "clipper"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    step_open_clip, step_clipper = build(args.batch, args.only, bf16=args.precision == "bf16")
    if args.only:
        (step_open_clip if args.only == "open_clip" else step_clipper)()
        for _ in range(args.steps):
            (step_open_clip if args.only == "open_clip" else step_clipper)()
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return

    first = {"open_clip": step_open_clip(), "clipper": step_clipper()}  # same weights, same batch
    print(f"first-step loss: open_clip {first['open_clip']:.6f}  clipper {first['clipper']:.6f}", flush=True)
    rates = interleaved_rates({"open_clip": step_open_clip, "clipper": step_clipper}, items_per_call=args.batch,
                              repeats=args.steps, warmup=0)
    result = {"config": {"vision": VISION, "text": TEXT, "embed_dim": 128, "batch": args.batch,
                         "optimizer": "AdamW", "precision": args.precision},
              "distinct_captions_in_batch": step_open_clip.distinct_captions, "first_step_loss": first, "loss_abs_diff": abs(first["open_clip"] - first["clipper"]),
              "samples_per_s": {k: round(v["per_s_median"], 2) for k, v in rates.items()}}
    result["ratio"] = round(result["samples_per_s"]["clipper"] / result["samples_per_s"]["open_clip"], 3)
    print(f"samples/s: open_clip {result['samples_per_s']['open_clip']:.1f}  clipper "
          f"{result['samples_per_s']['clipper']:.1f}  ratio {result['ratio']:.3f}", flush=True)
    result["peak_rss_mib"] = {w: round(peak_rss(w, args.batch, 2, args.threads, args.precision), 1)
                              for w in ("open_clip", "clipper")}
    print(f"peak RSS MiB: {result['peak_rss_mib']}")
    print("wrote", write_results("train_step" if args.precision == "fp32" else "train_step_bf16", result))


if __name__ == "__main__":
    main()
