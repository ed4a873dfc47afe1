"""A run folder: train config, JSONL metrics, checkpoints (atomic), the final model, curves.png.

    RUN/config.json             the TrainConfig
    RUN/metrics.jsonl           one JSON object per logged step or evaluation
    RUN/checkpoints/step-N/     model/ (config.json + model.safetensors), state.pt, checksums.json
    RUN/model/                  the final model directory
    RUN/curves.png              loss and evaluation curves
    RUN/summary.json            what the finished run did (steps, samples, time, the final evaluation)

A checkpoint is written to a hidden temporary folder and renamed into place when complete, so a
run killed mid-write leaves the previous checkpoint as the latest complete one; its checksums let a
resume pass over one damaged later (a full disk, a bad copy) for the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_model
from .errors import CheckpointError
from .factory import load_model
from .io import read_json_object, write_json, write_jsonl
from .model import CLIP

_STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
_CHECKED = ("state.pt", "model/model.safetensors", "model/config.json")
OWN_SCALES = {"cider_d": "CIDEr-D (x100)"}  # evaluation metrics that are not percentages
_STATE_KEYS = {"optimizer", "step", "epoch", "batch_in_epoch", "samples", "elapsed", "rng_torch", "rng_python"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders in step order (a folder is complete once renamed into place; whether
        its files are intact is for `load_checkpoint` to verify)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete temporary folders that a killed writer left behind; a checkpoint it was replacing
        (the same step written again) goes back into place if the new one never got there."""
        if not self.checkpoints.is_dir():
            return
        for p in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.checkpoints.glob(".old-*"):
            final = self.checkpoints / p.name.removeprefix(".old-")
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)

    def save_checkpoint(self, step: int, model: CLIP, state: dict[str, Any], keep: int) -> Path:
        """Write the checkpoint of `step` (model, training state, their checksums) to a temporary
        folder, rename it into place, then delete all but the newest `keep`."""
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp / "model")
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        write_json(tmp / CHECKSUMS, {name: _sha256(tmp / name) for name in _CHECKED})
        if final.exists():  # the same step again (a resumed run that ends where it started)
            old = self.checkpoints / f".old-{final.name}"
            os.rename(final, old)  # never a moment without a complete checkpoint of this step
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        for stale in self.complete_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[CLIP, dict[str, Any]]:
        """The model and training state of a checkpoint, its files verified against their
        checksums; CheckpointError naming the file otherwise."""
        sums = path / CHECKSUMS
        if sums.is_file():  # checkpoints written before checksums existed are read as they are
            expected = read_json_object(sums, "checkpoint checksums", {name: str for name in _CHECKED})
            for name in _CHECKED:
                if not (path / name).is_file() or _sha256(path / name) != expected[name]:
                    raise CheckpointError(f"{path / name}: missing or damaged (checksum differs)")
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file can fail in many ways; never unpickle beyond tensors
            raise CheckpointError(f"{path / 'state.pt'}: unreadable training state ({e})") from None
        if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
            raise CheckpointError(f"{path / 'state.pt'}: not a clipper training state")
        return load_model(path / "model"), state

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records; a last line cut short by a kill is left out."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # torn by a kill mid-write
        return [r for r in records if isinstance(r, dict) and "step" in r]

    def truncate_metrics(self, step: int) -> None:
        """Forget what was logged after `step` (a resumed run logs those steps again)."""
        if self.metrics.is_file():
            write_jsonl(self.metrics, [r for r in self.read_metrics() if r["step"] <= step])

    def plot(self) -> Path:
        """curves.png: training loss (and learning rate) by step, then the evaluation metrics against
        training time, one panel per scale (percentages; CIDEr-D, which is not one)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        names = sorted({k for r in evals for k, v in r["eval"].items()
                        if k not in ("n", "skipped") and isinstance(v, (int, float)) and not isinstance(v, bool)})
        scales = {scale: [n for n in names if OWN_SCALES.get(n, "%") == scale]
                  for scale in dict.fromkeys(OWN_SCALES.get(n, "%") for n in names)}
        fig, axes = plt.subplots(1, 1 + len(scales), figsize=(5.5 * (1 + len(scales)), 4), squeeze=False)
        axes = axes[0]
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
            axes[0].set_yscale("log")
            lr_axis = axes[0].twinx()
            lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray", alpha=0.5)
            lr_axis.set_ylabel("learning rate", color="tab:gray")
        axes[0].set(xlabel="step", ylabel="training loss", title="training")
        for ax, (scale, group) in zip(axes[1:], scales.items()):
            for name in group:
                points = [(r.get("elapsed", 0.0) / 60, r["eval"][name]) for r in evals if name in r["eval"]]
                ax.plot(*zip(*points), marker="o", label=name)
            ax.set(xlabel="training minutes", ylabel=scale, title=f"evaluation ({len(evals)} during the run)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        out = self.path / "curves.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out
