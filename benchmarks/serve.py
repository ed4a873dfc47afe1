"""`clipper serve` on loopback: requests/s and p50/p95 latency of /v1/embeddings for texts and
for images (one input per request) at 1, 8 and 32 concurrent clients, with the server's own
batching across clients. The server runs in a separate process (`clipper serve`), 2 threads.

    python benchmarks/serve.py [--model ViT-B-32] [--requests 64] [--seconds 60]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from clipper.serve.testing import free_port, wait_until_up  # noqa: E402


def post(url: str, body: dict) -> float:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t0


def load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    deadline = time.perf_counter() + seconds
    latencies = []

    def worker(i: int) -> None:
        for body in bodies[i::clients]:
            if time.perf_counter() > deadline:
                return
            latencies.append(post(url, body))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="anything `clipper serve --model` takes (random weights are fine)")
    ap.add_argument("--requests", type=int, default=64, help="requests per (modality, concurrency)")
    ap.add_argument("--seconds", type=float, default=60, help="time bound per (modality, concurrency)")
    args = ap.parse_args()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "clipper.cli", "serve", "--model", args.model,
                               "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base)
        rng = np.random.default_rng(0)
        images = []
        for _ in range(16):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
            images.append(base64.b64encode(buf.getvalue()).decode())
        bodies = {"text": [{"input": f"a photo of a thing, number {i}.", "modality": "text"} for i in range(args.requests)],
                  "image": [{"input": images[i % 16], "modality": "image"} for i in range(args.requests)]}
        post(base + "/v1/embeddings", bodies["text"][0])  # warm up
        post(base + "/v1/embeddings", bodies["image"][0])
        results = {"model": args.model, "requests_per_case": args.requests, "seconds_bound": args.seconds}
        for modality in ("text", "image"):
            for clients in (1, 8, 32):
                r = load(base + "/v1/embeddings", bodies[modality], clients, args.seconds)
                results[f"{modality}_{clients}_clients"] = r
                print(f"{modality:5s} {clients:2d} clients: {r}", flush=True)
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(base + "/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            results["server_batches"] = {s.labels["kind"]: int(s.value) for s in families["clipper_batches"].samples}
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("wrote", write_results("serve", results))


if __name__ == "__main__":
    main()
