"""Contrastive losses over features gathered from every rank (with gradients).

Each rank scores its own rows against the columns of all ranks (open_clip's `--local-loss
--gather-with-grad`): the mean of the ranks' losses equals the loss of one rank holding the whole
batch, and after DDP averages the gradients they equal that rank's gradients too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(features of all ranks concatenated in rank order, this rank's row offset); differentiable."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0), dist.get_rank() * features.shape[0]


def _diagnostics(logits: torch.Tensor, offset: int) -> dict[str, torch.Tensor]:
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, rows + offset]
    negatives = (logits.sum() - positive.sum()) / max(1, logits.numel() - positive.numel())
    return {"logit_pos": positive.mean().detach(), "logit_neg": negatives.detach()}


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE on L2-normalised features; `logit_scale` is the (clamped) temperature."""
    all_image, offset = gather(image)
    all_text, _ = gather(text)
    logits_image = logit_scale * image @ all_text.T
    logits_text = logit_scale * text @ all_image.T
    if logit_bias is not None:
        logits_image, logits_text = logits_image + logit_bias, logits_text + logit_bias
    labels = torch.arange(image.shape[0], device=image.device) + offset
    i2t, t2i = F.cross_entropy(logits_image, labels), F.cross_entropy(logits_text, labels)
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(),
            **_diagnostics(logits_image.detach(), offset)}


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """SigLIP: every (image, text) pair is a binary problem, +1 on the diagonal, -1 elsewhere;
    other ranks' texts are this rank's negatives. Normalised by the local batch size."""
    if logit_bias is None:
        raise ValueError("sigmoid loss needs a model with a logit bias (config init_logit_bias, e.g. -10)")
    all_text, offset = gather(text)
    logits = logit_scale * image @ all_text.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    labels[rows, rows + offset] = 1.0
    loss = -F.logsigmoid(labels * logits).sum() / image.shape[0]
    return {"loss": loss, **_diagnostics(logits.detach(), offset)}


LOSSES = {"infonce": infonce_loss, "sigmoid": sigmoid_loss}

