"""The CUDA checks of issues #4 and #6, in one short run on a lent GPU (scripts/gpu_check.sh):

1. training step at issue #4's identical config (batch 1024), clipper vs open_clip on the same
   weights and batch, fp32 and bf16 autocast: samples/s and the ratio;
2. `clipper train` on a Fashion-MNIST shard with bf16 autocast on CUDA: loss falls, zero-shot
   top-1 on a test shard, checkpoint written; the same with `compile`; the same under
   `torchrun --nproc_per_node 1` (NCCL);
3. the captioner on CUDA: greedy tokens with the KV cache equal the full recompute; tokens/s of each.

    python benchmarks/gpu_check.py --data DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rates  # noqa: E402
from train_step import build  # noqa: E402


def train_steps() -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        step_oc, step_ours = build(1024, device="cuda", bf16=precision == "bf16")
        rates = interleaved_rates({"open_clip": step_oc, "clipper": step_ours}, items_per_call=1024, repeats=20,
                                  warmup=3)
        sps = {k: round(v["per_s_median"], 1) for k, v in rates.items()}
        out[precision] = {"samples_per_s": sps, "ratio": round(sps["clipper"] / sps["open_clip"], 3)}
        print(precision, out[precision], flush=True)
    return out


def cli_train(data: Path, out: Path, name: str, extra: list[str], launcher: list[str] | None = None) -> dict:
    run = out / name
    cmd = [*(launcher or [sys.executable]), "-m", "clipper.train", "--preset", "fmnist-tiny",
           "--train-data", str(data / "train"), "--eval-task", "zeroshot-fmnist", "--eval-data", str(data / "test"),
           "--out", str(run), "--set", "device=cuda", "--set", "precision=bf16", "--set", "log_every=5", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-3000:]
        return result
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "top1" in r or "eval" in r]
    result |= {"first_loss": losses[0], "last_loss": losses[-1], "loss_fell": losses[-1] < losses[0],
               "samples_per_s_last": next((r["samples_per_s"] for r in reversed(rows) if "samples_per_s" in r), None),
               "peak_cuda_mib": max((r.get("peak_cuda_mib", 0) for r in rows), default=None),
               "eval": evals[-1] if evals else None, "files": sorted(p.name for p in run.iterdir())}
    return result


def decode() -> dict:
    import clipper
    from clipper.config import DecoderConfig
    from clipper.generate import GenerationConfig, generate

    config = clipper.preset("emoji-small")
    config.vision.image_size = 32  # 17 image tokens, as benchmarks/decode.py
    torch.manual_seed(0)
    model = clipper.CLIP(config)
    model.add_decoder(DecoderConfig(width=128, layers=3, heads=4, context_length=40))
    model = model.cuda().eval()
    pixels = torch.randn(8, 3, 32, 32, device="cuda")
    fixed = dict(max_new_tokens=32, min_new_tokens=32)
    cached = generate(model, pixels, cfg=GenerationConfig(**fixed))
    full = generate(model, pixels, cfg=GenerationConfig(use_cache=False, **fixed))

    def timed(use_cache: bool):
        def fn():
            generate(model, pixels, cfg=GenerationConfig(use_cache=use_cache, **fixed))
            torch.cuda.synchronize()
        return fn

    rates = interleaved_rates({"kv_cache": timed(True), "recompute": timed(False)}, items_per_call=8 * 32, repeats=5)
    tps = {k: round(v["per_s_median"], 1) for k, v in rates.items()}
    return {"cache_equals_recompute": cached == full, "tokens_per_s": tps,
            "cache_vs_recompute": round(tps["kv_cache"] / tps["recompute"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="fmnist shards: train/ and test/")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(results, flush=True)
    results["decode"] = decode()
    print("decode", results["decode"], flush=True)
    results["train_step_issue_config_batch1024"] = train_steps()
    steps = ["--steps", "150", "--set", "checkpoint_every=100"]
    results["cli_bf16"] = cli_train(args.data, args.out, "bf16", steps)
    print("cli_bf16", results["cli_bf16"], flush=True)
    results["cli_bf16_compile"] = cli_train(args.data, args.out, "compile", [*steps, "--set", "compile=true"])
    print("cli_bf16_compile", results["cli_bf16_compile"], flush=True)
    results["torchrun_nccl_1proc"] = cli_train(args.data, args.out, "torchrun", ["--steps", "60"],
                                               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"])
    print("torchrun", results["torchrun_nccl_1proc"], flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    os.sync()


if __name__ == "__main__":
    main()
