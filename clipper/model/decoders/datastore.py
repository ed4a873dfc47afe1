"""A retrieval datastore: captions and their text embeddings by the contrastive model, from which a
llava decoder with `retrieve` k puts the k captions nearest to an image into its prompt (SmallCap's
recipe). A folder of two files, read with bounds: swapping it changes what is retrieved at
inference, without retraining (clipper.retrieval builds one)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import io
from ...errors import DataError

CAPTIONS_FILE, VECTORS_FILE = "captions.json", "vectors.safetensors"
MAX_CAPTIONS, MAX_CAPTION_CHARS = 5_000_000, 2_000


def retrieval_prompt(prompt: str, captions: Sequence[str]) -> str:
    """The user's question with the retrieved captions before it."""
    return f"Similar images: {'; '.join(captions)}.\n{prompt}" if captions else prompt


@dataclass
class Datastore:
    captions: list[str]
    vectors: torch.Tensor  # [N, D] L2-normalised float32, row i the embedding of captions[i]

    def nearest(self, queries: torch.Tensor, k: int, exclude: Sequence[set[str]] | None = None) -> list[list[str]]:
        """For each normalised query [Q, D], the k captions of highest cosine similarity, best first,
        none of its `exclude` set (a training sample's own captions), each caption once."""
        if queries.shape[-1] != self.vectors.shape[1]:
            raise DataError(f"datastore: {self.vectors.shape[1]}-d vectors, the model embeds in {queries.shape[-1]}")
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        take = min(len(self.captions), k + extra)
        top = (queries.float().cpu() @ self.vectors.T).topk(take, dim=1).indices.tolist()
        out = []
        for i, row in enumerate(top):
            skip = exclude[i] if exclude else set()
            out.append([c for c in (self.captions[j] for j in row) if c not in skip][:k])
        return out

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(folder / VECTORS_FILE) as tmp:
            save_file({"vectors": self.vectors.float().contiguous()}, str(tmp), metadata={"format": "pt"})
        io.write_json(folder / CAPTIONS_FILE, self.captions)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Datastore":
        """The datastore of `folder`; DataError naming the file where it is not one."""
        from ...checkpoint import read_state_dict

        folder = Path(folder)
        captions = io.read_json(folder / CAPTIONS_FILE, "datastore captions")
        if not isinstance(captions, list) or not 0 < len(captions) <= MAX_CAPTIONS or \
                not all(isinstance(c, str) and 0 < len(c) <= MAX_CAPTION_CHARS for c in captions):
            raise DataError(f"{folder / CAPTIONS_FILE}: expected a list of 1 to {MAX_CAPTIONS} captions "
                            f"(strings of 1 to {MAX_CAPTION_CHARS} characters)")
        sd = read_state_dict(folder / VECTORS_FILE)
        vectors = sd.get("vectors")
        if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(captions) or \
                not vectors.is_floating_point() or not bool(torch.isfinite(vectors).all()):
            raise DataError(f"{folder / VECTORS_FILE}: expected finite 'vectors' [{len(captions)}, D], one per caption")
        return cls(captions, torch.nn.functional.normalize(vectors.float(), dim=-1))
