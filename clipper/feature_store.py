"""A frozen tower's features of each image, computed once. Keyed by a hash of the image's pixels
and of a fingerprint of what computes them (`fingerprint`: the computation's output on a fixed
probe image, so other weights, another feature layer or precision never read stale features),
they are kept in memory up to a byte budget and, given a folder, on disk as one safetensors file
per image, where a later run of the same tower (a resumed one, stage 2, another variant) finds
them. Training on a finite set of images (and of augmented views of each: `AugmentConfig.views`)
then costs the tower once per distinct view, not once per step."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import io

Compute = Callable[[torch.Tensor], torch.Tensor]


def evaluated(module: nn.Module, compute: Compute, x: torch.Tensor) -> torch.Tensor:
    """`compute(x)` without gradients, `module` in eval mode meanwhile (no dropout: what a cached
    row must equal whatever mode training left it in)."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return compute(x)
    finally:
        module.train(training)


def fingerprint(compute: Compute, shape: tuple[int, ...], device: torch.device | str = "cpu") -> str:
    """A hash of `compute`'s output on a seeded random probe of one image of `shape` (on `device`)."""
    probe = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        out = compute(probe)
    return hashlib.blake2b(out.detach().float().cpu().numpy().tobytes(), digest_size=8).hexdigest()


class FeatureStore:
    """compute(pixels [B, ...]) -> features [B, ...], each image's row computed once (a row repeated
    in the batch too). A file on disk that does not read back as a tensor (damaged) is computed
    again and replaced."""

    def __init__(self, namespace: str, folder: str | Path | None = None, max_bytes: int = 1 << 30):
        self.namespace = namespace
        self.folder = Path(folder) / namespace if folder else None
        self.rows: dict[str, torch.Tensor] = {}
        self.max_bytes, self.bytes = max_bytes, 0
        self.hits = self.misses = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def keys(pixels: torch.Tensor) -> list[str]:
        """Each row's key (the batch copied to the host once)."""
        host = pixels.detach().cpu().contiguous().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in host]

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        if self.folder is None or not self._path(key).is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self._path(key)))["features"]
        except Exception:  # damaged (the writes are atomic, but a disk is a disk): computed again
            return None

    def _keep(self, key: str, row: torch.Tensor, write: bool) -> None:
        if self.bytes + row.nbytes <= self.max_bytes:
            self.rows[key] = row
            self.bytes += row.nbytes
        if write and self.folder is not None:
            from safetensors.torch import save_file

            self._path(key).parent.mkdir(exist_ok=True)
            with io.atomic_path(self._path(key)) as tmp:
                save_file({"features": row.contiguous()}, str(tmp))

    def __call__(self, pixels: torch.Tensor, compute: Compute) -> torch.Tensor:
        keys = self.keys(pixels)
        found: dict[str, torch.Tensor] = {}
        missing: list[int] = []
        pending: set[str] = set()
        for i, key in enumerate(keys):
            if key in found or key in pending:
                continue
            row = self.rows.get(key)
            if row is None and (row := self._read(key)) is not None:
                self._keep(key, row, write=False)
            if row is None:
                missing.append(i)
                pending.add(key)
            else:
                found[key] = row
        if missing:
            with torch.no_grad():
                fresh = compute(pixels[missing]).detach().cpu()
            for i, row in zip(missing, fresh):
                found[keys[i]] = row.clone()
                self._keep(keys[i], found[keys[i]], write=True)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([found[key] for key in keys]).to(pixels.device)
