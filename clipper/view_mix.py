"""Patches swapped between the views of one thing (issue #18): with the two artists' drawings of an
emoji in one batch, a rectangle of one is pasted into the other (CutMix within a group, so the
caption stays right). Each image then holds two styles at once, side by side, and the tower cannot
tell the thing from the style of any one part."""

from __future__ import annotations

import math

import torch


def swap_view_patches(images: torch.Tensor, groups: torch.Tensor, p: float) -> torch.Tensor:
    """images [B, C, H, W], groups [B]: for each group's first two images, with probability p, one
    random rectangle (a quarter to half of the image, the same place in both) trades places
    between them. Returns a new tensor; torch's global RNG decides (a resumed run draws the same)."""
    groups = groups.cpu()  # the pairs are found and drawn on the CPU, whatever device holds the images
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    same_as_next = sorted_groups[1:] == sorted_groups[:-1]
    first = torch.ones_like(same_as_next)
    first[1:] = ~same_as_next[:-1]
    starts = (first & same_as_next).nonzero().flatten()  # a group's first image, with a second after it
    a, b = order[starts], order[starts + 1]
    chosen = torch.rand(len(a)) < p
    a, b = a[chosen].tolist(), b[chosen].tolist()
    out = images.clone()
    h, w = images.shape[-2:]
    for i, j in zip(a, b):
        area = float(torch.empty(()).uniform_(0.25, 0.5))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.5), math.log(2.0))))
        rh, rw = min(h, round(math.sqrt(area * ratio) * h)), min(w, round(math.sqrt(area / ratio) * w))
        top, left = int(torch.randint(0, h - rh + 1, ())), int(torch.randint(0, w - rw + 1, ()))
        box = (..., slice(top, top + rh), slice(left, left + rw))
        out[i][box], out[j][box] = images[j][box], images[i][box]
    return out
