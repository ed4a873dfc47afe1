"""LLaVA's recipe on (image, answer) pairs. Stage 1 (alignment): the projector alone learns to turn
a frozen image tower's features into inputs after which the frozen language model writes the
answer. Stage 2 (`train_lm`): the language model is tuned with it (at `lm_lr`). The tower stays
frozen in both: its features are computed once per image and kept (`tower_store`, on disk where
given a folder), so a step costs the language model's forward and backward only; the loss is on
the assistant's tokens alone (the answer and its end of turn), in the model's own chat template."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .. import io
from ..errors import ConfigError
from ..feature_store import FeatureStore, fingerprint
from .folder import folder_weights
from ..model.decoders.spliced import IGNORE
from .model import VLM


@dataclass
class AlignConfig:
    steps: int = 100
    minutes: float | None = None  # a wall-clock budget: training stops at it or at `steps`, what comes first
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 10  # linear warmup steps, then cosine decay to 0
    prompt: str = "Describe this image."
    seed: int = 0
    train_lm: bool = False  # stage 2: the language model trains too
    lm_lr: float = 2e-5  # its peak learning rate (LLaVA's stage 2)


def tower_store(vlm: VLM, folder: str | Path | None = None) -> FeatureStore:
    """The frozen tower's features of each frame (`VLM.tower_features`), computed once: in memory
    and, with `folder`, on disk."""
    size = vlm.vision.cfg.image_size
    return FeatureStore(fingerprint(vlm.tower_features, (3, size, size)), folder)


def batch_loss(vlm: VLM, features: Sequence[torch.Tensor], rows: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens of `rows` (right-padded) after each image's
    projected `features`."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r[0] + [0] * (n - len(r[0])) for r in rows], device=vlm.device)
    labels = torch.tensor([r[1] + [IGNORE] * (n - len(r[1])) for r in rows], device=vlm.device)
    valid = torch.tensor([[True] * len(r[0]) + [False] * (n - len(r[0])) for r in rows], device=vlm.device)
    image = vlm.project(torch.stack([f.to(vlm.device) for f in features]))
    return vlm.answer_loss(image, ids, labels, valid)


def _schedule(progress: float, step: int, cfg: AlignConfig) -> float:
    """The share of the peak learning rate: linear warmup over `warmup` steps, then cosine to 0
    at `progress` 1 (of steps or budget)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def align(vlm: VLM, images: Sequence[Image.Image], captions: Sequence[str], cfg: AlignConfig,
          store: FeatureStore | None = None, log=None) -> list[float]:
    """Stage 1 (or 2, `cfg.train_lm`) on (image, caption) pairs: the projector trains (and the
    language model), the tower stays as it is. Returns the loss of every step; `log(step, loss)`
    is called after each."""
    if len(images) != len(captions) or not images:
        raise ConfigError(f"align: {len(images)} images for {len(captions)} captions")
    store = store or tower_store(vlm)
    vlm.eval()  # no dropout anywhere; the frozen parts take no gradient
    for p in vlm.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(vlm.projector.parameters()), "peak": cfg.lr}]
    if cfg.train_lm:
        groups.append({"params": list(vlm.language.parameters()), "peak": cfg.lm_lr})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    prepared: dict[int, tuple[torch.Tensor, tuple[list[int], list[int]]]] = {}
    start = time.monotonic()
    for step in range(cfg.steps):
        spent = (time.monotonic() - start) / 60
        if cfg.minutes is not None and spent >= cfg.minutes:
            break
        progress = max(step / cfg.steps, spent / cfg.minutes if cfg.minutes else 0.0)
        picked = torch.randint(len(images), (min(cfg.batch_size, len(images)),), generator=generator).tolist()
        for i in picked:  # each pair's features and rows made once, at its first draw
            if i not in prepared:
                texts = vlm.processor.image_texts([images[i]])
                features = store(vlm.processor.pixels([images[i]]), vlm.tower_features).flatten(0, 1)
                prepared[i] = features, vlm.processor.answer_row(cfg.prompt, captions[i], texts)
        loss = batch_loss(vlm, [prepared[i][0] for i in picked], [prepared[i][1] for i in picked])
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * _schedule(progress, step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    for p in params:
        p.requires_grad_(False)
    return losses


def save_trained(vlm: VLM, folder: str | Path) -> None:
    """Write what `align` trains (the projector, and the language model) into the VLM's LLaVA
    folder's model.safetensors (replaced atomically), where transformers and `clipper.load` read it."""
    from safetensors.torch import save_file

    from .llava import _renamed

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder}: no model.safetensors to write into (a sharded folder is not rewritten)")
    sd = folder_weights(folder)
    projector, language = vlm.projector.state_dict(), vlm.language.hf_state_dict()
    found = set()
    for key in sd:
        name = _renamed(key)
        if name.startswith("model.multi_modal_projector."):
            ours = projector.get(name[len("model.multi_modal_projector."):])
        elif name.startswith("model.language_model."):
            ours = language.get("model." + name[len("model.language_model."):])
        elif name == "lm_head.weight":
            ours = language.get(name)
        else:
            continue
        if ours is None or ours.shape != sd[key].shape:
            raise ConfigError(f"{folder}: {key} is not this VLM's")
        sd[key] = ours.detach().to(sd[key].dtype).cpu().contiguous()
        found.add(name)
    if not any(n.startswith("model.multi_modal_projector.") for n in found):
        raise ConfigError(f"{folder}: no projector tensors to replace (not a LLaVA folder)")
    with io.atomic_path(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
