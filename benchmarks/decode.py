"""Caption generation speed, 2 threads, clipper's KV cache vs clipper recomputing the whole
sequence each step vs open_clip's CoCa `generate` (no cache; run by benchmarks/peer.py in a
subprocess with transformers 4.55, which open_clip 3.3's generate needs).

    python benchmarks/decode.py [--repeats 3]
        32 new tokens for 8 images: clipper's own decoder (3 x 128 on emoji-small's towers, full
        49,408 vocabulary, and again with the emoji captioner's own vocabulary), against an
        open_clip CoCa of comparable size (random weights: speed only).
    python benchmarks/decode.py --model coca_ViT-B-32 [--images 8] [--repeats 2]
        The same CoCa weights (random, seeded) in both: greedy and beam search (3 beams, 32 new
        tokens each), with the captions compared token for token; peak RSS of each process.

Runs of one mode alternate between clipper's paths; the peer's runs follow in its own process.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates, write_results  # noqa: E402
from peer import run_open_clip_generate  # noqa: E402

import clipper  # noqa: E402
from clipper.config import DecoderConfig  # noqa: E402
from clipper.data.reader import shard_captions  # noqa: E402
from clipper.generate import GenerationConfig, generate  # noqa: E402
from clipper.interop.open_clip import to_open_clip_state_dict  # noqa: E402
from clipper.tokenizer import Tokenizer, caption_vocabulary  # noqa: E402
from recipe import ensure_shards  # noqa: E402

NEW_TOKENS, BATCH, WIDTH, LAYERS, HEADS = 32, 8, 128, 3, 4
EOT = 49407

# As open_clip's coca_ViT-B-32.json, scaled down to clipper's small decoder below; the attentional
# pooler keeps 17 image tokens for the decoder, as many as clipper's prefix (class token + 16 patches).
SMALL_COCA = {"embed_dim": 128,
              "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 64,
                             "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 17,
                             "output_tokens": True},
              "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                           "embed_cls": True, "output_tokens": True},
              "multimodal_cfg": {"context_length": 40, "vocab_size": 49408, "width": WIDTH, "heads": HEADS,
                                 "layers": LAYERS, "attn_pooler_heads": 4}}


def _peer_rate(peer: dict | str, index: list[int], items: int) -> float | str:
    """Tokens/s of the peer's runs `index` (median), or why there is none."""
    if isinstance(peer, str):
        return peer
    return items / statistics.median(peer["runs"][i]["seconds"] for i in index)


def _fixed(**extra) -> GenerationConfig:
    # min = max new tokens: every run generates exactly 32 tokens per image, whatever the weights say
    return GenerationConfig(**{"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, **extra})


def small_models(repeats: int, tmp: Path) -> dict:
    config = clipper.preset("emoji-small")
    config.vision.image_size = 32  # 17 image tokens, as many as the CoCa pooler keeps
    torch.manual_seed(0)
    model = clipper.CLIP(config)
    model.add_decoder(DecoderConfig(width=WIDTH, layers=LAYERS, heads=HEADS, context_length=40))
    model.eval()
    # The emoji captioner's own vocabulary (its training captions' tokens): the 49,408-way head
    # read for every new token dominates the small decoder above, in both of its paths.
    vocab = caption_vocabulary(shard_captions(ensure_shards("emoji") / "train"), 40)
    torch.manual_seed(0)
    compact = clipper.CLIP(config)
    compact.add_decoder(DecoderConfig(width=WIDTH, layers=LAYERS, heads=HEADS, context_length=40, vocab=vocab))
    compact.eval()
    pixels = torch.randn(BATCH, 3, 32, 32)
    fns = {"clipper_kv_cache": lambda: generate(model, pixels, cfg=_fixed()),
           "clipper_recompute": lambda: generate(model, pixels, cfg=_fixed(use_cache=False)),
           "clipper_kv_cache_captioner_vocab": lambda: generate(compact, pixels, cfg=_fixed()),
           "clipper_recompute_captioner_vocab": lambda: generate(compact, pixels, cfg=_fixed(use_cache=False))}
    rates = interleaved_rates(fns, items_per_call=BATCH * NEW_TOKENS, repeats=repeats)
    save_file({"images": pixels}, tmp / "images.safetensors")
    # start + 31 sampled + the end token open_clip forces at seq_len: 32 forward passes, as clipper's 32 tokens
    greedy = dict(generation_type="top_k", top_k=1, seq_len=NEW_TOKENS + 1, min_seq_len=NEW_TOKENS,
                  fixed_output_length=True)
    peer = run_open_clip_generate(SMALL_COCA, None, tmp / "images.safetensors", [greedy] * (repeats + 1),
                                  tmp / "peer.json", threads=2)
    tps = {k: round(v["per_s_median"], 1) for k, v in rates.items()}
    peer_rate = _peer_rate(peer, list(range(1, repeats + 1)), BATCH * NEW_TOKENS)
    results = {"batch": BATCH, "new_tokens": NEW_TOKENS, "decoder": f"{LAYERS} x {WIDTH}, {HEADS} heads",
               "tokens_per_s": tps, "captioner_vocab_size": len(vocab),
               "cache_vs_recompute": round(tps["clipper_kv_cache"] / tps["clipper_recompute"], 2),
               "cache_vs_recompute_captioner_vocab": round(tps["clipper_kv_cache_captioner_vocab"]
                                                           / tps["clipper_recompute_captioner_vocab"], 2)}
    if isinstance(peer_rate, str):
        results["note"] = f"open_clip CoCa not measured: {peer_rate}"
    else:
        tps["open_clip_coca"] = round(peer_rate, 1)
        results["cache_vs_open_clip_coca"] = round(tps["clipper_kv_cache"] / peer_rate, 2)
        results["peer"] = {"transformers": peer["transformers"], "open_clip": peer["open_clip"]}
    return results


def coca(name: str, images: int, repeats: int, tmp: Path) -> dict:
    """One CoCa's weights in clipper and in open_clip: greedy and 3-beam captions of `images` images."""
    torch.manual_seed(0)
    model = clipper.load(name)
    size = model.config.vision.image_size
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    # logit: open_clip's beam scores. Its generate asserts seq_len > min_seq_len, so the beams may end
    # at the 32nd token (min 31 new tokens): still 32 steps, and the same rule on both sides.
    runs = {"greedy": {}, "beam3": {"num_beams": 3, "beam_score": "logit", "min_new_tokens": NEW_TOKENS - 1}}
    fns = {}
    for mode, extra in runs.items():
        fns[f"clipper_kv_cache_{mode}"] = lambda extra=extra: generate(model, pixels, cfg=_fixed(**extra))
        fns[f"clipper_recompute_{mode}"] = lambda extra=extra: generate(model, pixels, cfg=_fixed(use_cache=False,
                                                                                                  **extra))
    captions = {mode: [c[0] for c in generate(model, pixels, cfg=_fixed(**extra))] for mode, extra in runs.items()}
    rates = interleaved_rates(fns, items_per_call=images * NEW_TOKENS, repeats=repeats, warmup=0)
    clipper_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    save_file({k: v.contiguous() for k, v in to_open_clip_state_dict(model).items()}, tmp / "weights.safetensors")
    save_file({"images": pixels}, tmp / "images.safetensors")
    peer_runs = [dict(generation_type="top_k", top_k=1, seq_len=NEW_TOKENS + 2, min_seq_len=NEW_TOKENS + 1),
                 dict(generation_type="beam_search", num_beams=3, num_beam_groups=1, seq_len=NEW_TOKENS + 1,
                      min_seq_len=NEW_TOKENS)]
    peer = run_open_clip_generate(name, tmp / "weights.safetensors", tmp / "images.safetensors",
                                  [r for r in peer_runs for _ in range(repeats)], tmp / "peer.json", threads=2)
    tps = {k: round(v["per_s_median"], 1) for k, v in rates.items()}
    results = {"model": name, "images": images, "new_tokens": NEW_TOKENS, "weights": "random (seed 0)",
               "tokens_per_s": tps, "peak_rss_mb": {"clipper": clipper_rss}}
    tok = Tokenizer(77)
    for i, mode in enumerate(runs):
        results[f"cache_vs_recompute_{mode}"] = round(tps[f"clipper_kv_cache_{mode}"] / tps[f"clipper_recompute_{mode}"], 2)
        rate = _peer_rate(peer, list(range(i * repeats, (i + 1) * repeats)), images * NEW_TOKENS)
        if isinstance(rate, str):
            results["note"] = f"open_clip CoCa not measured: {rate}"
            continue
        tps[f"open_clip_coca_{mode}"] = round(rate, 1)
        results[f"cache_vs_open_clip_{mode}"] = round(tps[f"clipper_kv_cache_{mode}"] / rate, 2)
        rows = [row[1:] for row in peer["runs"][i * repeats]["tokens"]]
        theirs = [tok.decode(r[:r.index(EOT)] if EOT in r else r) for r in rows]
        results[f"same_captions_{mode}"] = theirs == captions[mode]
    if not isinstance(peer, str):
        results["peak_rss_mb"]["open_clip"] = peer["peak_rss_mb"]
        results["peer"] = {"transformers": peer["transformers"], "open_clip": peer["open_clip"]}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an open_clip CoCa (coca_ViT-B-32, coca_ViT-L-14): its weights in both")
    ap.add_argument("--images", type=int, default=BATCH)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 3, or 2 with --model)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="clipper-decode-") as tmp:  # weights files: gone also on failure
        if args.model:
            results = coca(args.model, args.images, args.repeats or 2, Path(tmp))
            name = f"decode_{args.model}"
        else:
            results = small_models(args.repeats or 3, Path(tmp))
            name = "decode"
    print(results)
    print("wrote", write_results(name, results))


if __name__ == "__main__":
    main()
