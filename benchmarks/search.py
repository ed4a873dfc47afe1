"""Search over 100k and 1M random unit 512-d vectors: single-query latency, recall@10 against exact
search, build time and memory, for clipper's exact torch search and the faiss indexes
(flat = exact, HNSW and IVF = approximate, IVF-PQ = compressed codes re-ranked exactly), 2 threads.
faiss-ivfpq searches the vectors as `clipper embed` leaves them (float16 .npy, memory-mapped) and
reports the memory it adds outside that file (anonymous RSS) and its codes' size.

Random vectors are the hard case for approximate search (no clusters to exploit); real CLIP
embeddings are easier. Queries are perturbed copies of indexed vectors, as near-duplicates are.

    python benchmarks/search.py [--sizes 100000 1000000] [--queries 100] [--kinds ...] [--name search]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from clipper.distributed import peak_rss_mib  # noqa: E402
from clipper.index import Index  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rss_mib(field: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(index: Index, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    index.search(queries[:2], k)  # warm up (exact: builds its float32 matrix)
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        result = index.search(q[None], k)
        latencies.append(time.perf_counter() - t0)
        found.append(result.indices[0])
    t0 = time.perf_counter()
    index.search(queries, k)
    batch_s = time.perf_counter() - t0
    recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
    top1 = np.mean([f[0] == t[0] for f, t in zip(found, truth)])
    return {"p50_ms": round(1000 * float(np.median(latencies)), 3), "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 3),
            "batch_queries_per_s": round(len(queries) / batch_s, 1), "recall_at_10": round(float(recall), 4),
            "top1_found": round(float(top1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--kinds", nargs="+", default=["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq"])
    ap.add_argument("--hnsw-max", type=int, default=200_000,
                    help="build HNSW only up to this size (its build takes ~30 s per 100k vectors here)")
    ap.add_argument("--ivf-lists", type=int, help="IVF cells of faiss-ivf/ivfpq (default: about 4 sqrt(N))")
    ap.add_argument("--name", default="search", help="results/NAME.json (another name keeps a full run's file)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    try:
        import faiss

        faiss.omp_set_num_threads(2)
    except ImportError:
        args.kinds = [k for k in args.kinds if not k.startswith("faiss")]
    k = 10
    results = {"dim": args.dim, "queries": args.queries, "k": k, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="clipper-search-") as tmp:
        _run(args, k, results, tmp)
    results["peak_rss_mib"] = peak_rss_mib()
    print("wrote", write_results(args.name, results))


def _run(args, k: int, results: dict, tmp: str) -> None:
    for n in args.sizes:
        rng = np.random.default_rng(0)
        vectors = _unit(rng.standard_normal((n, args.dim), dtype=np.float32))
        picks = rng.choice(n, args.queries, replace=False)
        queries = _unit(vectors[picks] + 0.5 * _unit(rng.standard_normal((args.queries, args.dim), dtype=np.float32)))
        truth = Index.build(vectors).search(queries, k).indices
        row = {"vectors_mib": round(vectors.nbytes / 2**20, 1)}
        for kind in args.kinds:
            if kind == "faiss-hnsw" and n > args.hnsw_max:
                continue
            source = vectors
            if kind == "faiss-ivfpq":  # as `clipper index` sees them: float16 on disk, memory-mapped
                np.save(Path(tmp) / "img_emb.npy", vectors.astype(np.float16))
                source = np.load(Path(tmp) / "img_emb.npy", mmap_mode="r")
            rss0, anon0 = _rss_mib(), _rss_mib("RssAnon:")
            t0 = time.perf_counter()
            index = Index.build(source, kind, **({"ivf_lists": args.ivf_lists} if args.ivf_lists else {}))
            build_s = time.perf_counter() - t0
            m = measure(index, queries, truth, k)
            m |= {"build_s": round(build_s, 2), "added_rss_mib": round(_rss_mib() - rss0, 1),
                  "added_anon_rss_mib": round(_rss_mib("RssAnon:") - anon0, 1)}
            if kind == "faiss-ivfpq":
                m["codes_mib"] = round(index.faiss_index.ntotal * index.faiss_index.code_size / 2**20, 1)
            row[kind] = m
            print(f"n={n:>8d} {kind:11s} {m}", flush=True)
            del index
        results["sizes"][str(n)] = row


if __name__ == "__main__":
    main()
