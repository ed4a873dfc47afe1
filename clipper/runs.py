"""A run folder: train config, JSONL metrics, checkpoints (atomic), the final model, curves.png.

    RUN/config.json             the TrainConfig
    RUN/metrics.jsonl           one JSON object per logged step or evaluation
    RUN/checkpoints/step-N/     model/ (config.json + model.safetensors) and state.pt
    RUN/model/                  the final model directory
    RUN/curves.png              loss and evaluation curves

A checkpoint is written to a hidden temporary folder and renamed into place when complete, so a
run killed mid-write leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

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
from .io import read_jsonl
from .model import CLIP

_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete temporary folders that a killed writer left behind."""
        if self.checkpoints.is_dir():
            for p in self.checkpoints.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def save_checkpoint(self, step: int, model: CLIP, state: dict[str, Any], keep: int) -> Path:
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp / "model")
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # the same step again (a resumed run that ends where it started)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in self.complete_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[CLIP, dict[str, Any]]:
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file can fail in many ways; never unpickle beyond tensors
            raise CheckpointError(f"{path / 'state.pt'}: unreadable training state ({e})") from None
        return load_model(path / "model"), state

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics, "metrics file") if self.metrics.is_file() else []

    def plot(self) -> Path:
        """curves.png: training loss (and learning rate), and every evaluation metric, by step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
            axes[0].set_yscale("log")
            lr_axis = axes[0].twinx()
            lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray", alpha=0.5)
            lr_axis.set_ylabel("learning rate", color="tab:gray")
        axes[0].set(xlabel="step", ylabel="training loss", title="training")
        for name in sorted({k for r in evals for k, v in r["eval"].items()
                            if k not in ("n", "skipped") and isinstance(v, (int, float))}):
            points = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
            axes[1].plot(*zip(*points), marker="o", label=name)
        axes[1].set(xlabel="step", ylabel="%", title="evaluation")
        if evals:
            axes[1].legend(fontsize=8)
        fig.tight_layout()
        out = self.path / "curves.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out
