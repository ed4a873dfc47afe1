"""Run open_clip's CoCa `generate` for benchmarks/peer.py (in the peer's environment).

    python benchmarks/open_clip_coca_generate.py SPEC.json OUT.json

SPEC: {"model": open_clip name, or "config": a CoCa config dict; "weights": an open_clip state
dict (.safetensors), or null for a seeded random init; "images": .safetensors with "images";
"runs": [generate keyword arguments, ...]}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    import open_clip
    import transformers
    from open_clip.coca_model import CoCa
    from safetensors.torch import load_file

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    cfg = spec.get("config") or open_clip.get_model_config(spec["model"])
    cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
    if spec.get("weights"):
        with torch.device("meta"):  # no random init: every weight is assigned
            model = CoCa(**cfg)
        model.load_state_dict(load_file(spec["weights"]), strict=True, assign=True)
        model.text.attn_mask = model.text.build_causal_mask()  # the two buffers outside the state dict
        model.text_decoder.attn_mask = model.text_decoder.build_attention_mask()
    else:
        torch.manual_seed(0)
        model = CoCa(**cfg)
    model.eval()
    images = load_file(spec["images"])["images"]
    results = []
    for kwargs in spec["runs"]:
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = model.generate(images, **kwargs)
        results.append({"tokens": tokens.tolist(), "seconds": time.perf_counter() - start})
    with open(out_path, "w") as f:
        json.dump({"runs": results, "transformers": transformers.__version__, "open_clip": open_clip.__version__,
                   "peak_rss_mb": round(peak_rss_mib())}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
