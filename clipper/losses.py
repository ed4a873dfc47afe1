"""Contrastive losses over features gathered from every rank (with gradients).

Each rank scores its own rows against the columns of all ranks (open_clip's `--local-loss
--gather-with-grad`): the mean of the ranks' losses equals the loss of one rank holding the whole
batch, and after DDP averages the gradients they equal that rank's gradients too.

Given the token ids of the captions, pairs whose captions are identical count as positives
rather than negatives: with templated captions many batch entries share a caption, and pushing
an image away from its own caption's twin only adds noise. This needs no labels. Given group ids
(views of one thing: the same emoji drawn by two artists), pairs of one group are positives too,
and `view_loss` pulls an image towards the other views of its group (SLIP's image-image term,
with the other view a real second rendering instead of a second crop).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import ConfigError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(features of all ranks concatenated in rank order, this rank's row offset); differentiable."""
    if not _distributed():
        return features, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0), dist.get_rank() * features.shape[0]


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `ids` (no gradient), in rank order."""
    if not _distributed():
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids)
    return torch.cat(parts)


def _diagonal(n_local: int, n_all: int, offset: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n_local, n_all, dtype=torch.bool, device=device)
    rows = torch.arange(n_local, device=device)
    mask[rows, rows + offset] = True
    return mask


def positive_mask(tokens: torch.Tensor | None, n_local: int, n_all: int, offset: int,
                  device: torch.device, groups: torch.Tensor | None = None) -> torch.Tensor:
    """[local, all] booleans: the diagonal, plus every pair with identical captions when tokens are
    given, plus every pair of one group when group ids are given."""
    mask = _diagonal(n_local, n_all, offset, device)
    if tokens is not None:
        mask |= (tokens[:, None, :] == _gather_ids(tokens)[None, :, :]).all(dim=-1)
    if groups is not None:
        mask |= groups[:, None] == _gather_ids(groups)[None, :]
    return mask


def _diagnostics(logits: torch.Tensor, positives: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logit_pos": logits[positives].mean().detach(), "logit_neg": logits[~positives].mean().detach()}


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each row's positives."""
    target = positives.float() / positives.sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE on L2-normalised features; `logit_scale` is the (clamped) temperature."""
    all_image, offset = gather(image)
    all_text, _ = gather(text)
    logits_image = logit_scale * image @ all_text.T
    logits_text = logit_scale * text @ all_image.T
    if logit_bias is not None:
        logits_image, logits_text = logits_image + logit_bias, logits_text + logit_bias
    positives = positive_mask(tokens, image.shape[0], all_text.shape[0], offset, image.device, groups)
    if tokens is None and groups is None:  # one positive a row: plain cross-entropy
        labels = torch.arange(image.shape[0], device=image.device) + offset
        i2t, t2i = F.cross_entropy(logits_image, labels), F.cross_entropy(logits_text, labels)
    else:
        i2t, t2i = _soft_cross_entropy(logits_image, positives), _soft_cross_entropy(logits_text, positives)
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(),
            **_diagnostics(logits_image.detach(), positives)}


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None, tokens: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SigLIP: every (image, text) pair is a binary problem, +1 for positives, -1 elsewhere;
    other ranks' texts are this rank's negatives. Normalised by the local batch size."""
    if logit_bias is None:
        raise ConfigError("sigmoid loss needs a model with a logit bias (config init_logit_bias, e.g. -10)")
    all_text, offset = gather(text)
    logits = logit_scale * image @ all_text.T + logit_bias
    positives = positive_mask(tokens, image.shape[0], all_text.shape[0], offset, image.device, groups)
    labels = positives.float() * 2 - 1
    loss = -F.logsigmoid(labels * logits).sum() / image.shape[0]
    return {"loss": loss, **_diagnostics(logits.detach(), positives)}


def view_loss(image: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """InfoNCE of each image against the other images of the batch (itself left out), the other
    views of its group being its positives; an image with no other view in the batch adds nothing."""
    all_image, offset = gather(image)
    own = _diagonal(image.shape[0], all_image.shape[0], offset, image.device)
    positives = (groups[:, None] == _gather_ids(groups)[None, :]) & ~own
    rows = positives.any(dim=1)
    if not rows.any():
        return image.sum() * 0.0  # keeps the graph (DDP expects every rank's backward)
    logits = (logit_scale * image[rows] @ all_image.T).masked_fill(own[rows], float("-inf"))
    log_p = F.log_softmax(logits, dim=1)
    target = positives[rows].float() / positives[rows].sum(dim=1, keepdim=True)
    return -torch.where(positives[rows], target * log_p, 0.0).sum(dim=1).mean()


LOSSES = {"infonce": infonce_loss, "sigmoid": sigmoid_loss}
