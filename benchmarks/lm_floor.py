"""The floor under a language model's decode step on this CPU: one token through every linear
layer of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down, and the 49,152-word head; random
weights at the real shapes), nothing else, in each weight format torch runs on the CPU. A decode
step reads every weight once, so no implementation of the step beats this time in that format:
it bounds the decode speedup any engine can reach over another that runs the same weights.

    python benchmarks/lm_floor.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

LAYERS, WIDTH, KV, HIDDEN, VOCAB = 30, 576, 192, 1536, 49152  # SmolLM2-135M


def _shapes() -> list[tuple[int, int]]:
    per_layer = [(WIDTH, WIDTH), (KV, WIDTH), (KV, WIDTH), (WIDTH, WIDTH), (HIDDEN, WIDTH), (HIDDEN, WIDTH),
                 (WIDTH, HIDDEN)]
    return per_layer * LAYERS + [(VOCAB, WIDTH)]


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def _formats(weights: list[torch.Tensor]) -> dict:
    """format -> (bytes per weight, a function running one token through every layer)."""
    inputs = {n: torch.randn(1, n) for n in (WIDTH, HIDDEN)}
    bf16 = [w.bfloat16() for w in weights]
    bf16_inputs = {n: x.bfloat16() for n, x in inputs.items()}
    formats = {"fp32": (4, lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]),
               "bf16": (2, lambda: [F.linear(bf16_inputs[w.shape[1]], w) for w in bf16])}
    if hasattr(torch.ops.quantized, "linear_dynamic"):  # clipper's int8 (quantize.Int8Linear: dynamic)
        from clipper.quantize import Int8Linear

        layers = []
        for w in weights:
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            layers.append(Int8Linear(linear))
        formats["int8 dynamic (fp32 in/out)"] = (1, lambda: [m(inputs[m.in_features]) for m in layers])
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):  # weight-only int8, per output channel
        packed = [(q, s.bfloat16()) for q, s in map(_int8, weights)]
        formats["int8 weight-only (bf16 in/out)"] = (1, lambda: [torch.ops.aten._weight_int8pack_mm(
            bf16_inputs[q.shape[1]], q, s) for q, s in packed])
    return formats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(*shape) * 0.02 for shape in _shapes()]
    params = sum(w.numel() for w in weights)
    out = {}
    with torch.inference_mode():
        for name, (width, run) in _formats(weights).items():
            run()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1000
            out[name] = {"ms_per_token": round(ms, 2), "tokens_per_s_ceiling": round(1000 / ms, 1),
                         "weight_gb_per_s": round(params * width / ms / 1e6, 1)}
            print(name, out[name], flush=True)
    result = {"model": "SmolLM2-135M linear layers (134.5M weights incl. the head)", "params": params,
              "repeats": args.repeats, "formats": out, "command": "python benchmarks/lm_floor.py"}
    print("wrote", write_results("lm_floor", result))


if __name__ == "__main__":
    main()
