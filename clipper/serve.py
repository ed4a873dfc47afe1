"""`clipper serve`: an HTTP service (FastAPI + uvicorn, extra `serve`) for embeddings in the
OpenAI shape, zero-shot labels, captions and search, plus a demo page at `/`, Prometheus metrics
at `/metrics` and the OpenAPI document at `/openapi.json` (browsable at `/docs`). Bodies are JSON,
or multipart/form-data where images are uploaded as files.

Requests from concurrent clients are batched: each kind of model call (text embedding, image
embedding) has one worker thread that takes whatever is queued, up to `max_batch` items, and runs
it as one forward pass. Inputs are checked against `Limits` before they reach the model; a bad
request gets a 4xx with a one-line reason and the server goes on serving.
"""


import asyncio
import base64
import binascii
import gc
import hmac
import io
import json
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .data.inputs import ImageItem
from .data.transforms import Normalize, ResizeCrop
from .config import from_dict
from .embed import classify_embeddings, embed_texts, open_index
from .errors import ClipperError, ImageError
from .images import decode_image, image_size
from .model import CLIP
from .prompts import check_templates
from .serve_config import Access, Limits
from .serve_schema import FORM_JSON_FIELDS, fields
from .tokenizer import tokenizer_for

DEMO_PAGE = Path(__file__).with_name("demo.html")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


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
            # a request whose client went away was cancelled: its items are not computed
            pending = [(items, future) for items, future in pending if future.set_running_or_notify_cancel()]
            if not pending:
                continue
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
                 max_batch: int = 32, access: Access | None = None):
        self.model, self.model_name, self.limits = model.eval(), model_name, limits or Limits()
        self.access = access or Access()
        self.resize, self.normalize = ResizeCrop(model.config.vision), Normalize(model.config.vision)
        self.tokenizer = tokenizer_for(model.config.text)  # usage counts
        self.texts = Batcher(self._embed_texts, max_batch)
        self.images = Batcher(self._embed_images, max_batch)
        self.index = self.ids = None
        if index_dir is not None:
            self.index, self.locations, manifest = open_index(index_dir, model)
            # clients see ids relative to the embedded folder; where the bytes are is for thumbnails only
            self.ids = [_public(row, manifest.get("source")) for row in self.locations]
        self.counts: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))  # the quantiles' window
        self.latency_sum: dict[str, float] = defaultdict(float)  # and count: of the requests answered
        self.latency_count: dict[str, int] = defaultdict(int)
        self.inflight = 0
        self.created = int(time.time())

    # --- model calls (worker threads) -------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> list[torch.Tensor]:
        return list(embed_texts(self.model, texts, to_numpy=False))

    @torch.inference_mode()
    def _embed_images(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        emb = self.model.encode_image(self.normalize(torch.stack(pixels)), normalize=True).float()
        return list(emb)

    # --- input checks ------------------------------------------------------------------------
    @staticmethod
    def image_bytes(value: Any, where: str) -> bytes:
        if isinstance(value, bytes):  # a multipart file
            return value
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{where}: expected a base64 string or a data: URI")
        if value.startswith("data:"):
            value = value.partition(",")[2]
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: not valid base64") from None

    def image(self, data: bytes, where: str) -> Image.Image:
        try:
            return decode_image(data, where, self.limits.max_pixels)
        except ImageError as e:
            raise BadRequest(str(e), 413 if "pixel limit" in str(e) else 400) from None

    async def pixels_of(self, values: Any, where: str) -> list[torch.Tensor]:
        """Decoded and resized images (uint8), off the event loop: a large image takes a while."""
        values = values if isinstance(values, list) else [values]
        if not values:
            raise BadRequest(f"{where}: empty list")
        if len(values) > self.limits.max_images:
            raise BadRequest(f"{where}: {len(values)} images, at most {self.limits.max_images} per request", 413)
        names = [f"{where}[{i}]" if len(values) > 1 else where for i in range(len(values))]
        blobs = [self.image_bytes(v, name) for v, name in zip(values, names)]

        def decode() -> list[torch.Tensor]:
            try:  # the whole request's pixels are counted from the headers before any is decoded
                total = sum(w * h for w, h in (image_size(b, name) for b, name in zip(blobs, names)))
            except ImageError as e:
                raise BadRequest(str(e)) from None
            if total > self.limits.max_request_pixels:
                raise BadRequest(f"{where}: {total} pixels in all, at most {self.limits.max_request_pixels} per "
                                 "request", 413)
            return [self.resize(self.image(b, name)) for b, name in zip(blobs, names)]

        return await asyncio.to_thread(decode)

    def texts_of(self, values: Any, where: str, max_chars: int | None = None, max_count: int | None = None) -> list[str]:
        values = values if isinstance(values, list) else [values]
        limit, count = max_chars or self.limits.max_text_chars, max_count or self.limits.max_texts
        if not values:
            raise BadRequest(f"{where}: empty list")
        if len(values) > count:
            raise BadRequest(f"{where}: {len(values)} texts, at most {count} per request", 413)
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise BadRequest(f"{where}[{i}]: expected a non-empty string")
            if len(v) > limit:
                raise BadRequest(f"{where}[{i}]: {len(v)} characters, at most {limit}", 413)
        return values

    def k_of(self, body: dict, default: int = 10) -> int:
        k = body.get("k", default)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k: an integer from 1 to {self.limits.max_k}")
        return k

    # --- operations --------------------------------------------------------------------------
    async def embed(self, texts: list[str] | None = None, pixels: list[torch.Tensor] | None = None) -> torch.Tensor:
        batcher, items = (self.texts, texts) if texts is not None else (self.images, pixels)
        return torch.stack(await asyncio.wrap_future(batcher.submit(items)))

    async def embeddings(self, body: dict) -> dict:
        _fields(body, "embeddings")
        modality = body.get("modality", "text")
        if modality not in ("text", "image"):
            raise BadRequest(f"modality: 'text' or 'image', got {modality!r}")
        if "input" not in body:
            raise BadRequest("input: missing")
        if body.get("model") is not None and body["model"] != self.model_name:
            raise BadRequest(f"model: {str(body['model'])[:100]!r} is not served here (this server serves "
                             f"{self.model_name!r}: GET /v1/models)", 404)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest(f"encoding_format: 'float' or 'base64', got {str(encoding)[:100]!r}")
        dim = self.model.config.embed_dim
        if body.get("dimensions") is not None and body["dimensions"] != dim:
            raise BadRequest(f"dimensions: this model's embeddings have {dim} (CLIP embeddings are not trained "
                             "to be shortened; leave dimensions out or give that)")
        if modality == "text":
            texts = self.texts_of(body["input"], "input")
            vectors = await self.embed(texts=texts)
            tokens = sum(len(self.tokenizer.encode(t)) for t in texts)
        else:
            vectors = await self.embed(pixels=await self.pixels_of(body["input"], "input"))
            tokens = 0
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "images": 0 if modality == "text" else len(vectors)}}

    async def classify(self, body: dict) -> dict:
        _fields(body, "classify")
        labels = body.get("labels")
        if isinstance(labels, str):
            labels = [x.strip() for x in labels.split(",") if x.strip()]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise BadRequest("labels: a non-empty list of names (or one comma-separated string)")
        if len(labels) > self.limits.max_labels:
            raise BadRequest(f"labels: at most {self.limits.max_labels}", 413)
        self.texts_of(labels, "labels", self.limits.max_label_chars, self.limits.max_labels)
        templates = body.get("templates")
        if templates is not None:
            if not isinstance(templates, list) or not templates or len(templates) > self.limits.max_templates:
                raise BadRequest(f"templates: a list of 1 to {self.limits.max_templates} strings with one '{{}}' each")
            check_templates(self.texts_of(templates, "templates", self.limits.max_label_chars,
                                          self.limits.max_templates), "templates")
        if len(labels) * len(templates or [None]) > self.limits.max_prompts:
            raise BadRequest(f"labels x templates: {len(labels) * len(templates)} prompts, at most "
                             f"{self.limits.max_prompts}", 413)
        k = self.k_of(body, 5)
        emb = await self.embed(pixels=await self.pixels_of(body.get("image"), "image"))
        result = await asyncio.to_thread(classify_embeddings, self.model, emb, labels, templates, k)
        return {"labels": [{"label": label, "prob": round(p, 6)} for label, p in result.top[0]]}

    def generation_of(self, options: Any):
        """Generation settings, their types checked (no string for a number, no NaN) and bounded."""
        from .generate import GenerationConfig

        if not isinstance(options, dict):
            raise BadRequest("options: an object of generation settings")
        cfg = from_dict(GenerationConfig, options, "options").validate()
        if max(cfg.num_beams, cfg.num_return_sequences) > self.limits.max_beams:
            raise BadRequest(f"options: num_beams and num_return_sequences at most {self.limits.max_beams}", 413)
        if not cfg.use_cache:
            raise BadRequest("options.use_cache: the server always decodes with the cache")
        if cfg.seed is not None and not 0 <= cfg.seed < 2 ** 63:
            raise BadRequest("options.seed: an integer from 0 to 2**63 - 1")
        return cfg

    async def caption(self, body: dict) -> dict:
        if self.model.decoder is None:
            raise BadRequest("this model has no caption decoder", 404)
        from .generate import generate

        _fields(body, "caption")
        cfg = self.generation_of(body.get("options") or {})
        prompt = body.get("prompt")
        if prompt is not None:
            self.texts_of(prompt, "prompt", self.limits.max_label_chars)
        pixels = self.normalize(torch.stack(await self.pixels_of(body.get("image", body.get("images")), "image")))
        captions = await asyncio.to_thread(generate, self.model, pixels,
                                           None if prompt is None else [prompt] * len(pixels), cfg)
        return {"captions": [c if len(c) > 1 else c[0] for c in captions]}

    async def search(self, body: dict) -> dict:
        if self.index is None:
            raise BadRequest("no index loaded (start the server with --index DIR)", 404)
        _fields(body, "search")
        if ("text" in body) == ("image" in body):
            raise BadRequest("give 'text' or 'image' (one of them)")
        k = self.k_of(body)
        if "text" in body:
            query = await self.embed(texts=self.texts_of(body["text"], "text")[:1])
        else:
            query = await self.embed(pixels=await self.pixels_of(body["image"], "image"))
        result = await asyncio.to_thread(self.index.search, query.numpy(), k)
        return {"results": [{"index": i, "score": round(s, 6), **self.ids[i]} for s, i in result.hits(0)]}

    def thumbnail(self, i: int, size: int = 128) -> bytes:
        if self.ids is None or not 0 <= i < len(self.ids):
            raise BadRequest(f"no indexed image {i}", 404)
        row = self.locations[i]
        item = ImageItem(row["id"], row.get("path", row["id"]), row.get("offset", 0), row.get("size", -1))
        try:
            im = decode_image(item.read(), item.id)
        except (OSError, ImageError):  # the reason would show a path on this machine
            raise BadRequest(f"image {i} is no longer readable", 404) from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def models(self) -> dict:
        """GET /v1/models, in OpenAI's shape; `classnames`: the labels the model was trained on, if any."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "clipper", "embedding_dim": self.model.config.embed_dim,
                                            "classnames": self.model.config.classnames or []}]}

    def metrics(self) -> str:
        """Prometheus' text format: requests, errors and latency (quantiles over the last 1,000
        requests) per endpoint, model batches per kind, requests at work."""
        lines = []

        def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP clipper_{name} {help}", f"# TYPE clipper_{name} {kind}"])
            lines.extend(f"clipper_{name}{labels} {value:.9g}" for labels, value in samples)

        endpoints = sorted(self.counts)
        family("requests_total", "counter", "Requests received, by endpoint.",
               [(f'{{endpoint="{e}"}}', self.counts[e]) for e in endpoints])
        family("request_errors_total", "counter", "Requests answered with an error, by endpoint.",
               [(f'{{endpoint="{e}"}}', self.errors[e]) for e in endpoints])
        latency = []
        for e in endpoints:
            window = sorted(self.latency[e])
            for q in (0.5, 0.95, 0.99):
                if window:
                    latency.append((f'{{endpoint="{e}",quantile="{q}"}}', window[min(len(window) - 1, int(q * len(window)))]))
        lines.extend(["# HELP clipper_request_duration_seconds Request latency, by endpoint.",
                      "# TYPE clipper_request_duration_seconds summary"])
        lines.extend(f"clipper_request_duration_seconds{labels} {value:.9g}" for labels, value in latency)
        for e in endpoints:
            lines.append(f'clipper_request_duration_seconds_sum{{endpoint="{e}"}} {self.latency_sum[e]:.9g}')
            lines.append(f'clipper_request_duration_seconds_count{{endpoint="{e}"}} {self.latency_count[e]}')
        family("batches_total", "counter", "Model forward passes of the batchers, by kind.",
               [('{kind="text"}', self.texts.batches), ('{kind="image"}', self.images.batches)])
        family("inflight_requests", "gauge", "Requests doing model work now.", [("", self.inflight)])
        return "\n".join(lines) + "\n"


def _fields(body: dict, endpoint: str) -> None:
    """Unknown or misplaced fields are an error, not ignored (e.g. a generation option outside "options")."""
    allowed = fields(endpoint)
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))} (this endpoint takes {', '.join(allowed)})")


def _encoded(vector: torch.Tensor, encoding: str) -> list[float] | str:
    """An embedding as OpenAI sends it: numbers, or base64 of little-endian float32 bytes."""
    if encoding == "float":
        return vector.tolist()
    return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()


def form_body(raw: bytes, content_type: str, max_parts: int) -> dict:
    """A multipart/form-data body as a JSON body would be: files as bytes, fields as text (the
    non-text ones, FORM_JSON_FIELDS, read as JSON), a repeated name as a list."""
    from email import policy
    from email.parser import BytesParser

    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1")
                                                          + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise BadRequest("body: not valid multipart/form-data (no boundary, or no parts)")
    parts = list(message.iter_parts())
    if not parts or len(parts) > max_parts:
        raise BadRequest(f"body: multipart/form-data with 1 to {max_parts} parts", 413 if parts else 400)
    body: dict[str, list] = {}
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise BadRequest("body: a multipart part without a name (Content-Disposition: form-data; name=...)")
        value = part.get_payload(decode=True) or b""
        if part.get_filename() is None:  # a field, not a file
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"{name}: not UTF-8 text") from None
            if name in FORM_JSON_FIELDS:
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):
                    raise BadRequest(f"{name}: not valid JSON") from None
        body.setdefault(name, []).append(value)
    out = {name: values[0] if len(values) == 1 else values for name, values in body.items()}
    if "modality" not in out and any(isinstance(v, bytes) for v in body.get("input", [])):
        out["modality"] = "image"  # files to embed are images
    return out


def _public(row: dict, source: str | None) -> dict:
    """An ids.jsonl row as clients see it: its id relative to the embedded folder, and its caption;
    never where the file is on this machine."""
    ident = row["id"]
    if source and ident.startswith(source.rstrip("/") + "/"):
        ident = ident[len(source.rstrip("/")) + 1:]
    return {"id": ident, **({"caption": row["caption"]} if row.get("caption") is not None else {})}


class BodyBudget:
    """The body bytes held at once by all the requests being received (`max_buffered_bytes`). A
    request that would take the total past it waits before reading on (uvicorn then stops reading
    its socket: the client is held by TCP), unless it is the only holder. Under a flood of uploads
    this bounds the memory the server touches: fresh pages for hundreds of buffered bodies cost
    seconds of page zeroing on the one event loop (measured in benchmarks/README.md). A body of at
    most `free_bytes` never waits, so clients that hold the budget (they must send ~budget bytes
    per read timeout to keep it) can delay large uploads but not queries and small images."""

    def __init__(self, limits: Limits, free_bytes: int = 64 << 10):
        self.limits, self.free_bytes, self.held = limits, free_bytes, 0
        self._freed: asyncio.Condition | None = None  # made on the serving loop, at first use

    def _condition(self) -> asyncio.Condition:
        if self._freed is None:
            self._freed = asyncio.Condition()
        return self._freed

    async def take(self, n: int, mine: int) -> None:
        """Count `n` more bytes held by a request that holds `mine` bytes already; return once the
        total fits (or the request holds it all)."""
        self.held += n
        try:
            if self.held > self.limits.max_buffered_bytes and mine + n > self.free_bytes:
                async with self._condition():
                    await self._freed.wait_for(
                        lambda: self.held <= self.limits.max_buffered_bytes or self.held == mine + n)
        except BaseException:  # the read timed out while waiting: these bytes are not held after all
            self.held -= n
            raise

    async def give(self, n: int) -> None:
        self.held -= n
        async with self._condition():
            self._freed.notify_all()


async def read_body(request, limit: int, timeout_s: float, budget: BodyBudget) -> bytes:
    """The body, within `limit` bytes and `timeout_s` seconds (a declared Content-Length over 4
    times the limit was refused before, by `_Admission`), held within `budget`. A body over the
    limit is refused (413) as soon as it passes the limit: on a kept-alive connection the server
    discards what follows while the client sends it, so the answer arrives whenever the client
    reads. A client that asked for `Connection: close` gets its body read and dropped up to 4
    times the limit first (closing on unread bytes resets the connection, and the client would
    lose the answer). A client that stalls gets 408; one that the budget kept waiting, 503."""
    too_large = BadRequest(f"request body of {request.headers.get('content-length') or 'over ' + str(limit)} bytes "
                           f"exceeds the limit of {limit}", 413)
    closing = request.headers.get("connection", "").strip().lower() == "close"
    drop_up_to = 4 * limit if closing else limit
    received = held = 0
    waiting = False

    async def read() -> bytes:
        nonlocal received, held, waiting
        chunks = []
        async for chunk in request.stream():
            received += len(chunk)
            if received > drop_up_to:
                raise too_large
            if received <= limit:
                chunks.append(chunk)
                waiting = True
                await budget.take(len(chunk), held)
                held, waiting = held + len(chunk), False
        if received > limit:
            raise too_large
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        if received > limit:  # what did arrive is already too much
            raise too_large from None
        if waiting:
            raise BadRequest("busy: receiving too many request bodies at once", 503, {"Retry-After": "1"}) from None
        raise BadRequest(f"request body not received within {timeout_s:g} s", 408) from None
    finally:
        await budget.give(held)


def create_app(service: Service):
    """The FastAPI application around `service`."""
    from fastapi import FastAPI, Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    from . import __version__
    from .serve_schema import components, request_body

    app = FastAPI(title="clipper", version=__version__, docs_url="/docs", redoc_url=None)
    budget = BodyBudget(service.limits)

    def openapi() -> dict:
        if app.openapi_schema is None:  # the request schemas are ours, not derived from the handlers
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=(__doc__ or "").split("\n\n")[0])
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def refusal(e: BadRequest) -> Response:
        return JSONResponse({"error": {"message": str(e), "status": e.status}}, status_code=e.status,
                            headers=e.headers)

    async def handle(request: Request, name: str, op) -> Response:
        t0 = time.perf_counter()
        service.counts[name] += 1
        working = False
        try:
            check_access(request)
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";")[0].strip().lower()
            if media not in ("application/json", "multipart/form-data"):
                raise BadRequest("Content-Type: send the body as application/json or multipart/form-data", 415)
            raw = await read_body(request, service.limits.max_body_bytes, service.limits.read_timeout_s, budget)
            # the limit is on requests doing work (reading a body costs little, and a body left
            # unread would reset the connection before the 503 arrived)
            if service.inflight >= service.limits.max_inflight:
                raise BadRequest("busy: too many requests at once", 503, {"Retry-After": "1"})
            service.inflight, working = service.inflight + 1, True
            if media == "multipart/form-data":
                limits = service.limits
                body = form_body(raw, content_type, limits.max_images + limits.max_texts + limits.max_templates + 8)
            else:
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):  # malformed, too deep, or an integer of thousands of digits
                    raise BadRequest("body: not valid JSON (or nested too deep, or a number too long)") from None
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object")
            return JSONResponse(await op(body))
        except ClipperError as e:  # an option or input the library refused
            service.errors[name] += 1
            return refusal(BadRequest(str(e)))
        except BadRequest as e:
            service.errors[name] += 1
            return refusal(e)
        finally:
            service.inflight -= working
            elapsed = time.perf_counter() - t0
            service.latency[name].append(elapsed)
            service.latency_sum[name] += elapsed
            service.latency_count[name] += 1

    def check_access(request: Request) -> None:
        access = service.access
        host = request.headers.get("host", "")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if access.allowed_hosts and hostname not in access.allowed_hosts:
            raise BadRequest(f"Host {host!r} is not one this server answers to", 421)
        if access.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), access.api_key.encode()):
                raise BadRequest("not authorised: send Authorization: Bearer <api key>", 401)

    def endpoint(name: str, op):
        async def run(request: Request):
            return await handle(request, name, op)
        return run

    for path, name, op in (("/v1/embeddings", "embeddings", service.embeddings), ("/classify", "classify", service.classify),
                           ("/caption", "caption", service.caption), ("/search", "search", service.search)):
        app.post(path, name=name, openapi_extra=request_body(name))(endpoint(name, op))

    @app.get("/thumbnail/{i}")
    async def thumbnail(i: int, request: Request):
        try:
            check_access(request)
            return Response(await asyncio.to_thread(service.thumbnail, i), media_type="image/png")
        except BadRequest as e:
            return refusal(e)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "caption": service.model.decoder is not None,
                "index": None if service.index is None else len(service.index)}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_access(request)
            return service.models()
        except BadRequest as e:
            return refusal(e)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        try:
            check_access(request)
            if model_id != service.model_name:
                raise BadRequest(f"model {model_id[:100]!r} is not served here", 404)
            return service.models()["data"][0]
        except BadRequest as e:
            return refusal(e)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return DEMO_PAGE.read_text(encoding="utf-8")

    return _Admission(app, service.limits)


class _Admission:
    """ASGI wrapper, before any framework work: at most `max_connections` requests open at once
    (more get 503 with Retry-After) and a declared body over 4 times `max_body_bytes` refused (413),
    both before the body is read. /health and /metrics always pass, so that a monitor sees a full
    server as busy, not dead (uvicorn's own limit_concurrency would refuse them too)."""
    EXEMPT = ("/health", "/metrics")

    def __init__(self, app, limits: Limits):
        self.app, self.limits, self.open = app, limits, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if self.open >= self.limits.max_connections:
            return await self.refuse(send, 503, "busy: too many open requests", [(b"retry-after", b"1")])
        if declared is not None and not declared.isdigit():
            return await self.refuse(send, 400, "Content-Length: not a number")
        if declared is not None and int(declared) > 4 * self.limits.max_body_bytes:
            return await self.refuse(send, 413, f"request body of {declared.decode()} bytes exceeds the limit of "
                                                f"{self.limits.max_body_bytes}")
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1

    @staticmethod
    async def refuse(send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"error": {"message": message, "status": status}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    # The model, torch and the framework are ~400,000 objects that live as long as the server; left to
    # the cyclic collector, each full collection walks them all (~140 ms) on the event loop, and a
    # flood of connections triggers them. Frozen, a collection walks only what requests allocated.
    gc.freeze()
    # SIGTERM: stop taking requests, give running ones 5 s; idle keep-alive connections close after 5 s
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                timeout_keep_alive=5)


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
