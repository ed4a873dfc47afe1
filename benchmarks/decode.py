"""Caption generation speed: 32 new tokens for a batch of 8 images, 2 threads. clipper's decoder
with its KV cache, the same decoder recomputing the whole sequence each step, and open_clip's
CoCa `generate` (top-k 1, i.e. greedy; it needs `transformers`) at a comparable size: image tower
ViT 4 x 128 on 32 px with 8 px patches, decoder 3 x 128, the full 49,408-token vocabulary on both;
and clipper's cache vs recompute again with the emoji captioner's own vocabulary.

    python benchmarks/decode.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates, write_results  # noqa: E402

import clipper  # noqa: E402
from clipper.config import DecoderConfig  # noqa: E402
from clipper.data.reader import shard_captions  # noqa: E402
from clipper.generate import GenerationConfig, generate  # noqa: E402
from clipper.tokenizer import caption_vocabulary  # noqa: E402
from recipe import ensure_shards  # noqa: E402

NEW_TOKENS, BATCH, WIDTH, LAYERS, HEADS = 32, 8, 128, 3, 4


def open_clip_coca():
    import open_clip

    # As open_clip's coca_ViT-B-32.json, scaled down; the attentional pooler keeps 17 image
    # tokens for the decoder, as many as clipper's prefix (class token + 16 patches).
    cfg = {"embed_dim": 128,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 64,
                          "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 17,
                          "output_tokens": True},
           "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                        "embed_cls": True, "output_tokens": True},
           "multimodal_cfg": {"context_length": 40, "vocab_size": 49408, "width": WIDTH, "heads": HEADS,
                              "layers": LAYERS, "attn_pooler_heads": 4}}
    return open_clip.CoCa(**cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    # emoji-small's towers on 32 px images: 17 image tokens, as many as CoCa's pooler keeps below
    config = clipper.preset("emoji-small")
    config.vision.image_size = 32
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
    # min = max new tokens: every run generates exactly 32 tokens per image, whatever the weights say
    fixed = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    fns = {"clipper_kv_cache": lambda: generate(model, pixels, cfg=GenerationConfig(**fixed)),
           "clipper_recompute": lambda: generate(model, pixels, cfg=GenerationConfig(use_cache=False, **fixed)),
           "clipper_kv_cache_captioner_vocab": lambda: generate(compact, pixels, cfg=GenerationConfig(**fixed)),
           "clipper_recompute_captioner_vocab": lambda: generate(compact, pixels,
                                                                 cfg=GenerationConfig(use_cache=False, **fixed))}
    note = None
    if importlib.util.find_spec("transformers") is not None:
        coca = open_clip_coca()

        def run_coca():
            with torch.inference_mode():
                out = coca.generate(pixels, generation_type="top_k", top_k=1, seq_len=NEW_TOKENS + 1,
                                    min_seq_len=NEW_TOKENS, fixed_output_length=True)
            assert out.shape[1] == NEW_TOKENS + 1, out.shape  # start token + 32 generated

        fns["open_clip_coca"] = run_coca
    else:
        note = "open_clip CoCa generate needs transformers, which is not installed: not measured"
    rates = interleaved_rates(fns, items_per_call=BATCH * NEW_TOKENS, repeats=args.repeats)
    results = {"batch": BATCH, "new_tokens": NEW_TOKENS, "decoder": f"{LAYERS} x {WIDTH}, {HEADS} heads",
               "tokens_per_s": {k: round(v["per_s_median"], 1) for k, v in rates.items()}}
    tps = results["tokens_per_s"]
    results["cache_vs_recompute"] = round(tps["clipper_kv_cache"] / tps["clipper_recompute"], 2)
    results["captioner_vocab_size"] = len(vocab)
    results["cache_vs_recompute_captioner_vocab"] = round(tps["clipper_kv_cache_captioner_vocab"]
                                                          / tps["clipper_recompute_captioner_vocab"], 2)
    if "open_clip_coca" in tps:
        results["cache_vs_open_clip_coca"] = round(tps["clipper_kv_cache"] / tps["open_clip_coca"], 2)
    if note:
        results["note"] = note
    print(results)
    print("wrote", write_results("decode", results))


if __name__ == "__main__":
    main()
