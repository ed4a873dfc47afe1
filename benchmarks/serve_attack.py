"""`clipper serve` under attack, on loopback only, every loop bounded in count and time.

A tiny model is served by a real `clipper serve` process (1 MiB body limit, 5 s read timeout).
At once: 500 clients announce a 10 GB body and send a few bytes, 500 stream a chunked body
without end (64 KiB chunks, at most 40 each), 200 send their headers one byte a second
(slowloris, 20 s), 300 send a request line and a Host header and then nothing, 10 of each
multipart bomb of issue #37 (within the body limit) and 50 cross-site multipart posts, while
/health is timed every 50 ms and the server's memory is sampled. Then 300 concurrent ordinary
requests, then each text, generation and multipart bomb once, alone. Writes results/serve_attack.json and prints
the table.

    python benchmarks/serve_attack.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import clipper  # noqa: E402
from clipper.config import DecoderConfig  # noqa: E402
from clipper.serve.testing import free_port, wait_until_up  # noqa: E402
from clipper.tokenizer import caption_vocabulary  # noqa: E402

TINY = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
        "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}
HEAD = "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of process `pid`."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def _status(reader: asyncio.StreamReader, timeout: float) -> int | None:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split(b" ")[1]) if line.startswith(b"HTTP/") else None
    except (asyncio.TimeoutError, ConnectionError, IndexError, ValueError):
        return None


async def huge_announced(port: int) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((HEAD.format(path="/v1/embeddings") + "Content-Length: 10000000000\r\n\r\n{\"input\":").encode())
    await writer.drain()
    status = await _status(reader, 30)
    writer.close()
    return status, time.perf_counter() - t0


async def endless_chunked(port: int) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((HEAD.format(path="/v1/embeddings") + "Transfer-Encoding: chunked\r\n\r\n").encode())
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    read = asyncio.ensure_future(_status(reader, 60))
    for _ in range(40):
        if read.done():
            break
        try:
            writer.write(chunk)
            await writer.drain()
        except ConnectionError:
            break
    status = await read
    writer.close()
    return status, time.perf_counter() - t0


async def slowloris(port: int, seconds: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (HEAD.format(path="/v1/embeddings") + "X-Slow: " + "a" * 100).encode()
    deadline = time.monotonic() + seconds
    sent = 0
    try:
        while time.monotonic() < deadline and sent < len(request):
            writer.write(request[sent:sent + 1])
            await writer.drain()
            sent += 1
            await asyncio.sleep(1.0)
        return "held to the end"
    except ConnectionError:
        return "closed by the server"
    finally:
        writer.close()


async def raw(port: int, data: bytes, timeout: float = 30) -> tuple[int | None, float]:
    """Send `data` on a fresh connection; (the answer's status, seconds until it came)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass
    status = await _status(reader, timeout)
    writer.close()
    return status, time.perf_counter() - t0


def _form(parts: list[tuple[str, bytes]]) -> bytes:
    return b"".join(b"--B\r\n" + head.encode() + b"\r\n\r\n" + data + b"\r\n" for head, data in parts) + b"--B--\r\n"


_FILE = 'Content-Disposition: form-data; name="image"; filename='
_LABELS = ('Content-Disposition: form-data; name="labels"', b"red, blue")
# issue #37's multipart bombs, each within the 1 MiB body limit: (Content-Type parameters, body)
MULTIPART_BOMBS = {
    "encoded words in a file name": ("", _form([(_FILE + '"' + "=?utf-8?q?a?= " * 20_000 + '"', b"x"), _LABELS])),
    "100,000 empty parts": ("", b"--B\r\n\r\n\r\n" * 100_000),
    "50,000 name*N parameters": ("", _form([("Content-Disposition: form-data" + "".join(
        f'; name*{i}="a"' for i in range(50_000)), b"x")])),
    "2,000 ( in a disposition": ("", _form([(_FILE + '"a.png"' + "(" * 2000, b"x"), _LABELS])),
    "multipart nested 3,000 deep": ("", _form([('Content-Disposition: form-data; name="image"\r\n'
                                                'Content-Type: multipart/mixed; boundary=C',
                                                b"--C\r\nContent-Type: multipart/mixed; boundary=C\r\n\r\n" * 3000)])),
    "Content-Type of 100,000 parameters": ("; a=b" * 100_000, _form([_LABELS])),
}


def multipart(body: bytes, params: str = "", extra: str = "") -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B{params}\r\n"
            f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def watch_health(port: int, pid: int, stop, out) -> None:
    """In its own process (the attackers' event loop would delay its timings): GET /health every
    50 ms with a fresh connection, and the server's memory, until `stop` is set."""
    import socket

    times, statuses, rss, starts = [], [], [], []
    begin = time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        starts.append(t0 - begin)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                statuses.append(sock.recv(64).split(b" ")[1].decode())
        except (OSError, IndexError):
            statuses.append("none")
        times.append(time.perf_counter() - t0)
        rss.append(_rss_mib(pid)[0])
        time.sleep(0.05)
    out.put((times, statuses, rss, starts))


async def request(port: int, path: str, body: bytes) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((HEAD.format(path=path) + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    await writer.drain()
    status = await _status(reader, 60)
    writer.close()
    return status, time.perf_counter() - t0


async def attack(port: int, pid: int, slow_seconds: float) -> dict:
    import multiprocessing

    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    watcher = multiprocessing.Process(target=watch_health, args=(port, pid, stop, out))
    watcher.start()
    t0 = time.perf_counter()
    unfinished = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    cross_site = multipart(_form([_LABELS]), extra="Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\n")
    results = await asyncio.gather(*[huge_announced(port) for _ in range(500)],
                                   *[endless_chunked(port) for _ in range(500)],
                                   *[slowloris(port, slow_seconds) for _ in range(200)],
                                   *[raw(port, unfinished) for _ in range(300)],
                                   *[raw(port, multipart(body, params)) for params, body in MULTIPART_BOMBS.values()
                                     for _ in range(10)],
                                   *[raw(port, cross_site) for _ in range(50)], return_exceptions=True)
    wall = time.perf_counter() - t0
    stop.set()
    health_times, statuses, rss, starts = out.get(timeout=30)
    watcher.join(timeout=30)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    kinds, at = {}, 1200
    groups = [("10 GB announced", results[:500]), ("chunked without end", results[500:1000]),
              ("headers never finished", results[at:at + 300])]
    at += 300
    for name in MULTIPART_BOMBS:
        groups.append((f"multipart: {name}", results[at:at + 10]))
        at += 10
    groups.append(("cross-site multipart", results[at:at + 50]))
    for name, part in groups:
        done = [r for r in part if not isinstance(r, BaseException)]
        kinds[name] = {"answered": f"{sum(s is not None for s, _ in done)} / {len(part)}",
                       "status": dict(Counter(str(s) for s, _ in done)),
                       "max_s": round(max((t for _, t in done), default=0), 2)}
    return {
        "wall_s": round(wall, 1),
        **kinds,
        "slowloris": dict(Counter(r for r in results[1000:1200] if isinstance(r, str))),
        "client_errors": errors[:5],
        "health_checks": len(health_times),
        "health_status": dict(Counter(statuses)),
        "health_p50_ms": round(1000 * statistics.median(health_times), 1),
        "health_p99_ms": round(1000 * np.percentile(health_times, 99), 1),
        # when the slowest checks started (s into the attack): a burst at the start or spread out
        "health_slowest": [(round(starts[i], 1), round(1000 * health_times[i], 1))
                           for i in np.argsort(health_times)[::-1][:5]],
        "server_rss_max_mib": round(max(rss), 1),
    }


async def ordinary(port: int) -> dict:
    bodies = [json.dumps({"input": f"a photo of thing {i}"}).encode() for i in range(300)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*[request(port, "/v1/embeddings", b) for b in bodies])
    return {"requests": 300, "ok": sum(s == 200 for s, _ in results), "status": dict(Counter(str(s) for s, _ in results)),
            "wall_s": round(time.perf_counter() - t0, 2)}


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BOMBS = {
    "label of 200,000 letters": ("/classify", {"image": None, "labels": ["x" * 200_000]}),
    "1,000 labels x 200 templates": ("/classify", {"image": None, "labels": [f"l{i}" for i in range(1000)],
                                                  "templates": [f"{{}} {i}" for i in range(200)]}),
    "5,000 beams": ("/caption", {"image": None, "options": {"num_beams": 5000}}),
    "5,000 return sequences": ("/caption", {"image": None, "options": {"num_return_sequences": 5000,
                                                                      "do_sample": True}}),
    "num_beams 2.5": ("/caption", {"image": None, "options": {"num_beams": 2.5}}),
    "do_sample \"false\"": ("/caption", {"image": None, "options": {"do_sample": "false"}}),
    "use_cache false": ("/caption", {"image": None, "options": {"use_cache": False}}),
    "prompt of 100,000 letters": ("/caption", {"image": None, "prompt": "y" * 100_000}),
    "template \"{} {\"": ("/classify", {"image": None, "labels": ["a"], "templates": ["{} {"]}),
}


async def bombs(port: int) -> dict:
    out = {}
    for name, (path, body) in BOMBS.items():
        body = {**body, "image": _png()}
        status, seconds = await request(port, path, json.dumps(body).encode())
        out[name] = {"status": status, "ms": round(1000 * seconds, 1)}
    for name, (path, body) in {
            "NaN temperature": ("/caption", b'{"image": "x", "options": {"temperature": NaN}}'),
            "5,000-digit integer": ("/v1/embeddings", b'{"input": "a", "user": ' + b"9" * 5000 + b"}"),
            "10,000-deep JSON": ("/v1/embeddings", b"[" * 10000 + b"]" * 10000),
            "lone surrogate label": ("/classify", b'{"image": "%s", "labels": ["\\ud800"]}' % _png().encode()),
            "temperature 1e-308": ("/caption", b'{"image": "%s", "options": {"do_sample": true, "temperature": 1e-308}}'
                                   % _png().encode()),
            "length_penalty 1e308": ("/caption", b'{"image": "%s", "options": {"num_beams": 4, "length_penalty": 1e308}}'
                                     % _png().encode()),
            "prompt as a list": ("/caption", b'{"image": "%s", "prompt": ["a", "b"]}' % _png().encode())}.items():
        status, seconds = await request(port, path, body)
        out[name] = {"status": status, "ms": round(1000 * seconds, 1)}
    for name, (params, body) in MULTIPART_BOMBS.items():  # alone: the parse's own cost
        status, seconds = await raw(port, multipart(body, params))
        out[f"multipart: {name}"] = {"status": status, "ms": round(1000 * seconds, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow-seconds", type=float, default=20.0, help="how long each slowloris client trickles")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # 1,200 client sockets; the server inherits it
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = clipper.CLIP(clipper.ModelConfig.from_dict(TINY))
        model.add_decoder(DecoderConfig(width=32, layers=1, heads=2, context_length=10,
                                        vocab=caption_vocabulary(["a red square", "a blue square"], 10)))
        model.save(Path(tmp) / "model")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "clipper", "serve", "--model", str(Path(tmp) / "model"),
                                   "--port", str(port), "--max-body-bytes", str(1 << 20), "--read-timeout-s", "5"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until_up(f"http://127.0.0.1:{port}")
            results = {"attack": asyncio.run(attack(port, server.pid, args.slow_seconds))}
            results["after"] = asyncio.run(ordinary(port))
            results["bombs"] = asyncio.run(bombs(port))
            results["server_peak_rss_mib"] = round(_rss_mib(server.pid)[1], 1)
        finally:
            t0 = time.perf_counter()
            server.terminate()
            server.wait(timeout=30)
            results["sigterm_exit_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(results, indent=2))
    print(f"wrote {write_results('serve_attack', results)}")


if __name__ == "__main__":
    main()
