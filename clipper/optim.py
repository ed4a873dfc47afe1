"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .train_config import TrainConfig
from .model import CLIP


def param_groups(model: CLIP, cfg: TrainConfig, later: Sequence[torch.nn.Module] = ()) -> list[dict]:
    """Per tower (own lr scale; a llava decoder's language model counts as one), decayed and not: gains, biases, 1-d embeddings and the logit
    scale/bias (all tensors of dimension < 2) get no weight decay. The trainable parameters, and
    those of `later` (parts unlocked during the run: until then they have no gradient, so AdamW
    passes them over)."""
    pending = {id(p) for part in later for p in part.parameters()}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and id(p) not in pending:
            continue
        tower = name.split(".")[0] if name.startswith(("visual.", "text.")) else \
            "language" if name.startswith("decoder.language.") else "other"
        groups.setdefault((tower, p.ndim >= 2), []).append(p)
    scale = {"visual": cfg.image_lr_scale, "text": cfg.text_lr_scale, "language": cfg.language_lr_scale, "other": 1.0}
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale[tower],
             "name": f"{tower}{'' if decay else '-no-decay'}"} for (tower, decay), params in sorted(groups.items())]


def make_optimizer(model: CLIP, cfg: TrainConfig, later: Sequence[torch.nn.Module] = ()) -> torch.optim.AdamW:
    # The fused kernel updates all tensors in one pass: measured 7x faster than the per-tensor
    # loop on 2 CPU cores (26 -> 4 ms a step for fmnist-tiny, whose 6.3M-row embedding dominates).
    return torch.optim.AdamW(param_groups(model, cfg, later), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


WARMUP_SHARE = 0.1  # warmup ends by this share of the run at the latest: a short fine-tune must not end warming up


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps` (or over the first WARMUP_SHARE of the run, if that ends
    sooner), then cosine decay to zero as `progress` goes 0 -> 1."""
    warm = min(1.0, max((step + 1) / cfg.warmup_steps, progress / WARMUP_SHARE)) if cfg.warmup_steps > 0 else 1.0
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
