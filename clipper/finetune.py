"""Fine-tuning from a trained model: WiSE-FT's weight-space ensemble (Wortsman et al., 2022), the
fine-tuned weights mixed with the ones the run started from, which keeps much of what the start
knew while keeping much of what the fine-tune learned."""

from __future__ import annotations

import torch

from .model import CLIP


def mix_weights(model: CLIP, start: dict[str, torch.Tensor], alpha: float) -> None:
    """model <- alpha * model + (1 - alpha) * start, in place, floating-point tensors only (the
    others, e.g. counters, stay the fine-tuned ones)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name in start:
                tensor.mul_(alpha).add_(start[name].to(tensor), alpha=1 - alpha)
