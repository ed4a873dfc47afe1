"""The peer that CoCa generation is compared with: open_clip's own `CoCa.generate`, run in a
subprocess whose `transformers` is a release before 4.56 (open_clip 3.3's generate imports
`BeamSearchScorer`, which later releases removed; clipper itself needs no transformers).

The pinned packages go into a folder of their own (`.peer/`, or $CLIPPER_PEER_DIR) with
`pip install --target --no-deps`, put first on the subprocess's PYTHONPATH; torch and open_clip
come from the running environment. Used by tests/test_coca.py and benchmarks/decode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_PACKAGES = ["transformers==4.55.4", "huggingface_hub==0.36.0", "tokenizers==0.21.4", "requests==2.34.2",
                 "urllib3==2.8.0", "idna==3.20", "charset_normalizer==3.5.3", "certifi==2026.10.19.post1"]
SCRIPT = Path(__file__).resolve().parent / "open_clip_coca_generate.py"


def peer_dir() -> Path | str:
    """The folder holding the pinned packages (installed on first use), or why it cannot be had."""
    target = Path(os.environ.get("CLIPPER_PEER_DIR", ROOT / ".peer")) / "transformers-4.55.4"
    stamp = target / ".complete"
    if stamp.exists():
        return target
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), *PEER_PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr.strip() or done.stdout.strip() or "pip failed").splitlines()
        return f"could not install the peer's transformers 4.55 ({lines[-1][:200]})"
    stamp.write_text(" ".join(PEER_PACKAGES) + "\n")
    return target


def run_open_clip_generate(model: str | dict, weights: Path | None, images: Path, runs: list[dict], out: Path,
                           timeout: float = 3600, threads: int | None = None) -> dict | str:
    """open_clip's CoCa `model` (a name, or a config dict) with `weights` (an open_clip state dict,
    .safetensors; None: a seeded random init) runs `generate` on the images (a .safetensors holding
    "images") once per entry of `runs` (keyword arguments of generate); returns {"runs": [{"tokens",
    "seconds"}, ...], "transformers", "open_clip", "peak_rss_mb"}, or why it could not run."""
    where = peer_dir()
    if isinstance(where, str):
        return where
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({("config" if isinstance(model, dict) else "model"): model, "runs": runs,
                                "weights": None if weights is None else str(weights), "images": str(images),
                                **({"threads": threads} if threads else {})}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(SCRIPT), str(spec), str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode:
        return f"open_clip's generate failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    return json.loads(out.read_text())
