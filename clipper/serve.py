"""`clipper serve`: an HTTP service (FastAPI + uvicorn, extra `serve`) for embeddings in the
OpenAI shape, zero-shot labels, captions and search, plus a demo page at `/`.

Requests from concurrent clients are batched: each kind of model call (text embedding, image
embedding) has one worker thread that takes whatever is queued, up to `max_batch` items, and runs
it as one forward pass. Inputs are checked against `Limits` before they reach the model; a bad
request gets a 4xx with a one-line reason and the server goes on serving.
"""


import asyncio
import base64
import binascii
import io
import json
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .data.inputs import ImageItem
from .data.transforms import Normalize, ResizeCrop
from .embed import classify_embeddings, embed_texts, open_index
from .errors import ImageError
from .images import decode_image
from .model import CLIP
from .tokenizer import Tokenizer

DEMO_PAGE = Path(__file__).with_name("demo.html")


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20
    max_images: int = 16  # per request
    max_pixels: int = 40_000_000  # per image
    max_texts: int = 256  # per request
    max_text_chars: int = 2000
    max_labels: int = 1000
    max_k: int = 100


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Batcher:
    """One worker thread running `fn` on the items of all queued requests at once."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32):
        self.fn, self.max_batch = fn, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, items: list) -> Future:
        future: Future = Future()
        self.queue.put((items, future))
        return future

    def _loop(self) -> None:
        while True:
            pending = [self.queue.get()]
            size = len(pending[0][0])
            while size < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                pending.append(nxt)
                size += len(nxt[0])
            try:
                results = self.fn([item for items, _ in pending for item in items])
                self.batches += 1
                start = 0
                for items, future in pending:
                    future.set_result(results[start:start + len(items)])
                    start += len(items)
            except Exception as e:  # the model failed: every waiting request learns why
                for _, future in pending:
                    future.set_exception(e)


class Service:
    """The model, the optional index, the batchers and the request metrics."""

    def __init__(self, model: CLIP, model_name: str, index_dir: str | None = None, limits: Limits | None = None,
                 max_batch: int = 32):
        self.model, self.model_name, self.limits = model.eval(), model_name, limits or Limits()
        self.resize, self.normalize = ResizeCrop(model.config.vision), Normalize(model.config.vision)
        self.tokenizer = Tokenizer(model.config.text.context_length)  # usage counts
        self.texts = Batcher(self._embed_texts, max_batch)
        self.images = Batcher(self._embed_images, max_batch)
        self.index = self.ids = None
        if index_dir is not None:
            self.index, self.ids, _ = open_index(index_dir, model.config.embed_dim)
        self.counts: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))

    # --- model calls (worker threads) -------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> list[torch.Tensor]:
        return list(embed_texts(self.model, texts, to_numpy=False))

    @torch.inference_mode()
    def _embed_images(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        emb = self.model.encode_image(self.normalize(torch.stack(pixels)), normalize=True).float()
        return list(emb)

    # --- input checks ------------------------------------------------------------------------
    def image(self, value: Any, where: str) -> Image.Image:
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{where}: expected a base64 string or a data: URI")
        if value.startswith("data:"):
            value = value.partition(",")[2]
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: not valid base64") from None
        try:
            return decode_image(data, where, self.limits.max_pixels)
        except ImageError as e:
            raise BadRequest(str(e), 413 if "pixel limit" in str(e) else 400) from None

    def images_of(self, values: Any, where: str) -> list[Image.Image]:
        values = values if isinstance(values, list) else [values]
        if not values:
            raise BadRequest(f"{where}: empty list")
        if len(values) > self.limits.max_images:
            raise BadRequest(f"{where}: {len(values)} images, at most {self.limits.max_images} per request", 413)
        return [self.image(v, f"{where}[{i}]") for i, v in enumerate(values)]

    def texts_of(self, values: Any, where: str) -> list[str]:
        values = values if isinstance(values, list) else [values]
        if not values:
            raise BadRequest(f"{where}: empty list")
        if len(values) > self.limits.max_texts:
            raise BadRequest(f"{where}: {len(values)} texts, at most {self.limits.max_texts} per request", 413)
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise BadRequest(f"{where}[{i}]: expected a non-empty string")
            if len(v) > self.limits.max_text_chars:
                raise BadRequest(f"{where}[{i}]: {len(v)} characters, at most {self.limits.max_text_chars}", 413)
        return values

    def k_of(self, body: dict, default: int = 10) -> int:
        k = body.get("k", default)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k: an integer from 1 to {self.limits.max_k}")
        return k

    # --- operations --------------------------------------------------------------------------
    async def embed(self, texts: list[str] | None = None, images: list[Image.Image] | None = None) -> torch.Tensor:
        if texts is not None:
            rows = await asyncio.wrap_future(self.texts.submit(texts))
        else:
            rows = await asyncio.wrap_future(self.images.submit([self.resize(im) for im in images]))
        return torch.stack(rows)

    async def embeddings(self, body: dict) -> dict:
        modality = body.get("modality", "text")
        if modality not in ("text", "image"):
            raise BadRequest(f"modality: 'text' or 'image', got {modality!r}")
        if "input" not in body:
            raise BadRequest("input: missing")
        if modality == "text":
            texts = self.texts_of(body["input"], "input")
            vectors = await self.embed(texts=texts)
            tokens = sum(len(self.tokenizer.encode(t)) for t in texts)
        else:
            vectors = await self.embed(images=self.images_of(body["input"], "input"))
            tokens = 0
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "images": 0 if modality == "text" else len(vectors)}}

    async def classify(self, body: dict) -> dict:
        image = self.image(body.get("image"), "image")
        labels = body.get("labels")
        if isinstance(labels, str):
            labels = [x.strip() for x in labels.split(",") if x.strip()]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise BadRequest("labels: a non-empty list of names (or one comma-separated string)")
        if len(labels) > self.limits.max_labels:
            raise BadRequest(f"labels: at most {self.limits.max_labels}", 413)
        templates = body.get("templates")
        if templates is not None and (not isinstance(templates, list) or
                                      not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
            raise BadRequest("templates: a list of strings with one '{}' each")
        emb = await self.embed(images=[image])
        result = await asyncio.to_thread(classify_embeddings, self.model, emb, labels, templates, self.k_of(body, 5))
        return {"labels": [{"label": label, "prob": round(p, 6)} for label, p in result.top[0]]}

    async def caption(self, body: dict) -> dict:
        if self.model.decoder is None:
            raise BadRequest("this model has no caption decoder", 404)
        from .generate import GenerationConfig, generate

        images = self.images_of(body.get("image", body.get("images")), "image")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise BadRequest("options: an object of generation settings")
        try:
            cfg = GenerationConfig(**options).validate()
        except TypeError as e:
            raise BadRequest(f"options: {e}") from None
        except ValueError as e:
            raise BadRequest(str(e)) from None
        pixels = self.normalize(torch.stack([self.resize(im) for im in images]))
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequest("prompt: a string")
        try:
            captions = await asyncio.to_thread(generate, self.model, pixels,
                                               None if prompt is None else [prompt] * len(images), cfg)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return {"captions": [c if len(c) > 1 else c[0] for c in captions]}

    async def search(self, body: dict) -> dict:
        if self.index is None:
            raise BadRequest("no index loaded (start the server with --index DIR)", 404)
        if ("text" in body) == ("image" in body):
            raise BadRequest("give 'text' or 'image' (one of them)")
        if "text" in body:
            query = await self.embed(texts=self.texts_of(body["text"], "text")[:1])
        else:
            query = await self.embed(images=[self.image(body["image"], "image")])
        result = await asyncio.to_thread(self.index.search, query.numpy(), self.k_of(body))
        return {"results": [{"index": i, "score": round(s, 6), **self.ids[i]} for s, i in result.hits(0)]}

    def thumbnail(self, i: int, size: int = 128) -> bytes:
        if self.ids is None or not 0 <= i < len(self.ids):
            raise BadRequest(f"no indexed image {i}", 404)
        row = self.ids[i]
        item = ImageItem(row["id"], row.get("path", row["id"]), row.get("offset", 0), row.get("size", -1))
        try:
            im = decode_image(item.read(), item.id)
        except (OSError, ImageError) as e:
            raise BadRequest(f"image {i} is no longer readable ({e})", 404) from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def metrics(self) -> dict:
        def pct(values, q):
            values = sorted(values)
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2) if values else None

        return {"requests": dict(self.counts), "errors": dict(self.errors),
                "latency_ms": {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95)} for k, v in self.latency.items()},
                "batches": {"text": self.texts.batches, "image": self.images.batches}}


async def read_body(request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` (the rest is read and dropped, so that the client
    gets the answer instead of a broken connection)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise BadRequest(f"request body of {size} bytes exceeds the limit of {limit}", 413)
    return b"".join(chunks)


def create_app(service: Service):
    """The FastAPI application around `service`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="clipper", docs_url=None, redoc_url=None)

    async def handle(request: Request, name: str, op) -> Response:
        t0 = time.perf_counter()
        service.counts[name] += 1
        try:
            raw = await read_body(request, service.limits.max_body_bytes)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("body: not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object")
            return JSONResponse(await op(body))
        except BadRequest as e:
            service.errors[name] += 1
            return JSONResponse({"error": {"message": str(e), "status": e.status}}, status_code=e.status)
        finally:
            service.latency[name].append(time.perf_counter() - t0)

    def endpoint(name: str, op):
        async def run(request: Request):
            return await handle(request, name, op)
        return run

    for path, name, op in (("/v1/embeddings", "embeddings", service.embeddings), ("/classify", "classify", service.classify),
                           ("/caption", "caption", service.caption), ("/search", "search", service.search)):
        app.post(path, name=name)(endpoint(name, op))

    @app.get("/thumbnail/{i}")
    async def thumbnail(i: int):
        try:
            return Response(await asyncio.to_thread(service.thumbnail, i), media_type="image/png")
        except BadRequest as e:
            return JSONResponse({"error": {"message": str(e), "status": e.status}}, status_code=e.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "caption": service.model.decoder is not None,
                "index": None if service.index is None else len(service.index)}

    @app.get("/metrics")
    async def metrics():
        return service.metrics()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return DEMO_PAGE.read_text(encoding="utf-8")

    return app


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 120) -> None:
    """Poll `url`/health until the server answers (or raise after `seconds`)."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url.rstrip("/") + "/health", timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: no answer after {seconds} s") from None
            time.sleep(0.1)


def serve_in_thread(service: Service) -> tuple[str, Callable[[], None]]:
    """Start the service on a free loopback port in a thread: (base URL, stop function)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    wait_until_up(url)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return url, stop
