"""Nearest-neighbour search over normalised embeddings (inner product = cosine similarity).

`exact`: a torch matmul over the vectors held in memory as float32, in blocks with a running
top-k (the score matrix of many queries stays bounded). With `faiss-cpu` installed (extra `index`): `faiss-flat` (exact),
`faiss-hnsw` and `faiss-ivf` (approximate, for large collections), and `faiss-ivfpq`: compressed
(product-quantised codes of `pq_bytes` bytes per vector in memory, 32x less than float32 at 512-d),
its candidates re-ranked by exact scores read from the memory-mapped vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError, MissingFileError
from .io import atomic_path, read_json_object, write_json

INDEX_FILE = "index.json"
FAISS_FILE = "index.faiss"
KINDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq")
PQ_MIN_VECTORS = 256 * 39  # faiss's minimum for training 256 centroids per sub-quantiser
SCORES_PER_BLOCK = 1 << 26  # query x vector scores held at once (256 MiB)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss indexes need faiss-cpu: pip install 'clipper[index]'") from None
    return faiss


@dataclass
class SearchResult:
    """scores [Q, k] and positions [Q, k] into the indexed vectors, best first (faiss pads a row
    with position -1 when it found fewer than k)."""
    scores: np.ndarray
    indices: np.ndarray

    def hits(self, row: int = 0) -> list[tuple[float, int]]:
        """(score, position) of query `row`'s results, best first, padding left out."""
        return [(float(s), int(i)) for s, i in zip(self.scores[row], self.indices[row]) if i >= 0]


class Index:
    def __init__(self, vectors: np.ndarray, kind: str = "exact", faiss_index=None, params: dict | None = None):
        if kind not in KINDS:
            raise ConfigError(f"kind: one of {', '.join(KINDS)}, got {kind!r}")
        if vectors.ndim != 2:
            raise DataError(f"vectors: expected [N, D], got shape {list(vectors.shape)}")
        check_finite(vectors)
        self.vectors, self.kind, self.params = vectors, kind, params or {}
        self.faiss_index = faiss_index
        self._matrix: torch.Tensor | None = None  # float32 copy for exact search, made on first use

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "exact", hnsw_m: int = 32, ef_search: int = 128,
              ivf_lists: int | None = None, nprobe: int = 32, pq_bytes: int | None = None, rerank: int = 8,
              seed: int = 0) -> "Index":
        """`hnsw_m`, `ef_search`: HNSW graph degree and search breadth; `ivf_lists`, `nprobe`: IVF
        cells (default about 4 sqrt(N)) and cells visited per query; `pq_bytes`: code bytes per
        vector of faiss-ivfpq (default D / 8, a divisor of D), whose `rerank` x k best candidates are
        re-scored exactly. Wider is slower and closer to exact."""
        if kind == "exact":
            return cls(vectors, kind)
        if kind not in KINDS:
            raise ConfigError(f"kind: one of {', '.join(KINDS)}, got {kind!r}")
        check_finite(vectors)  # before faiss trains on them
        faiss = _faiss()
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = data.shape
        if kind == "faiss-flat":
            index, params = faiss.IndexFlatIP(d), {}
        elif kind == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            index.hnsw.efSearch = ef_search
            params = {"hnsw_m": hnsw_m, "ef_search": ef_search}
        else:
            lists = ivf_lists or max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 points per list
            params = {"ivf_lists": lists, "nprobe": nprobe}
            if kind == "faiss-ivf":
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
            else:
                m = pq_bytes or max(1, d // 8)
                if n < PQ_MIN_VECTORS:  # each sub-quantiser learns 256 centroids from the vectors
                    raise ConfigError(f"faiss-ivfpq compresses large collections (at least {PQ_MIN_VECTORS} vectors, "
                                      f"these are {n}); use exact or faiss-ivf")
                if d % m or rerank < 1:
                    raise ConfigError(f"pq_bytes {m} must divide the dimension {d}, and rerank {rerank} be >= 1")
                index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, m, 8, faiss.METRIC_INNER_PRODUCT)
                params |= {"pq_bytes": m, "rerank": rerank}
            rng = np.random.default_rng(seed)
            sample = data[rng.choice(n, min(n, max(256 * lists, PQ_MIN_VECTORS if kind == "faiss-ivfpq" else 0)),
                                     replace=False)]
            index.train(sample)
            index.nprobe = nprobe
        index.add(data)
        return cls(vectors, kind, index, params)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> SearchResult:
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise ConfigError(f"queries: dimension {q.shape[1]}, the index holds {self.dim}-d vectors")
        k = min(k, len(self))
        if k < 1:
            raise ConfigError("k: must be >= 1 (and the index non-empty)")
        if self.faiss_index is not None and self.kind == "faiss-ivfpq":
            return self._rerank(q.numpy(), k)
        if self.faiss_index is not None:
            scores, indices = self.faiss_index.search(q.numpy(), k)
            return SearchResult(scores, indices)
        if self._matrix is None:
            matrix = np.asarray(self.vectors, dtype=np.float32)
            if not (matrix.flags.writeable and matrix.flags.c_contiguous):  # e.g. a read-only memory map
                matrix = np.array(matrix, order="C")
            self._matrix = torch.from_numpy(matrix)
        rows = max(k, SCORES_PER_BLOCK // q.shape[0])
        best_s, best_i = None, None
        for start in range(0, len(self), rows):
            s, i = (q @ self._matrix[start:start + rows].T).topk(min(k, len(self) - start), dim=1)
            i += start
            if best_s is not None:  # merge with the best so far
                s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, order)
            best_s, best_i = s, i
        return SearchResult(best_s.numpy(), best_i.numpy())

    def _rerank(self, q: np.ndarray, k: int) -> SearchResult:
        """The compressed index's rerank x k candidates, re-scored from the vectors (only those rows
        are read from the memory map) and the best k kept."""
        _, candidates = self.faiss_index.search(q, min(len(self), k * self.params.get("rerank", 1)))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        indices = np.full((len(q), k), -1, dtype=np.int64)
        for row, found in enumerate(candidates):
            found = np.unique(found[found >= 0])  # sorted: the memory map is read in order
            exact = np.asarray(self.vectors[found], dtype=np.float32) @ q[row]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, :len(best)], indices[row, :len(best)] = exact[best], found[best]
        return SearchResult(scores, indices)

    def save(self, folder: str | os.PathLike, vectors_file: str = "img_emb.npy") -> None:
        """index.json (+ index.faiss) in `folder`, which holds the vectors as `vectors_file`."""
        folder = Path(folder)
        if self.faiss_index is not None:
            faiss = _faiss()
            with atomic_path(folder / FAISS_FILE) as tmp:
                faiss.write_index(self.faiss_index, str(tmp))
        meta = {"kind": self.kind, "count": len(self), "dim": self.dim, "vectors": vectors_file, **self.params}
        write_json(folder / INDEX_FILE, meta)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Index":
        folder = Path(folder)
        meta_path = folder / INDEX_FILE
        if not meta_path.is_file():
            raise MissingFileError(f"{folder}: no {INDEX_FILE} (build one with `clipper index {folder}`)")
        meta = read_json_object(meta_path, "index description", {"kind": str, "count": int, "dim": int, "vectors": str})
        if meta["kind"] not in KINDS:
            raise DataError(f"{meta_path}: kind {meta['kind']!r} is not one of {', '.join(KINDS)}")
        vectors = load_vectors(folder / meta["vectors"])
        if vectors.shape != (meta["count"], meta["dim"]):
            raise DataError(f"{folder / meta['vectors']}: shape {list(vectors.shape)} does not match "
                            f"{INDEX_FILE} ({meta['count']} x {meta['dim']}); rebuild the index")
        faiss_index = None
        if meta["kind"] != "exact":
            faiss = _faiss()
            try:
                faiss_index = faiss.read_index(str(folder / FAISS_FILE))
            except RuntimeError as e:  # faiss reports every bad file as a RuntimeError
                raise DataError(f"{folder / FAISS_FILE}: not a readable faiss index ({str(e).strip()[:200]})") from None
            if faiss_index.ntotal != len(vectors) or faiss_index.d != vectors.shape[1]:
                raise DataError(f"{folder / FAISS_FILE}: {faiss_index.ntotal} x {faiss_index.d} vectors, "
                                f"{INDEX_FILE} says {meta['count']} x {meta['dim']}; rebuild the index")
            if "nprobe" in meta:
                faiss_index.nprobe = meta["nprobe"]
            if "ef_search" in meta:
                faiss_index.hnsw.efSearch = meta["ef_search"]
        params = {k: v for k, v in meta.items() if k not in ("kind", "count", "dim", "vectors")}
        return cls(vectors, meta["kind"], faiss_index, params)


def check_finite(vectors: np.ndarray) -> None:
    """Refuse vectors with a NaN or infinite entry: one such row makes every search's scores NaN."""
    for start in range(0, len(vectors), 1 << 16):  # in slices: the vectors may be a memory map
        bad = np.flatnonzero(~np.isfinite(vectors[start:start + (1 << 16)]).all(axis=1))
        if len(bad):
            raise DataError(f"vectors: row {start + int(bad[0])} is not finite (NaN or inf); embed that image again")


def load_vectors(path: str | os.PathLike) -> np.ndarray:
    """An [N, D] float .npy file, memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such embeddings file (make one with `clipper embed`)")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({str(e).strip()[:200]})") from None
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise DataError(f"{path}: expected an [N, D] float array, got {vectors.dtype} {list(vectors.shape)}")
    return vectors
