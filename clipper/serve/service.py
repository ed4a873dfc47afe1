"""The service behind `clipper serve`: the model, its batchers, each endpoint's checks and work, the
index and its thumbnails, the metrics."""

from __future__ import annotations



import abc
import asyncio
import base64
import binascii
import io
import os
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from typing import Any, Callable

import torch
from PIL import Image

from ..data.items import ImageItem
from ..config import from_dict
from ..embed import classify_embeddings, embed_texts
from ..embed_dir import open_index
from ..errors import ImageError
from ..images import decode_image, image_size
from ..model import CLIP
from ..prompts import check_templates
from .config import Access, Limits
from .body import BadRequest
from .schema import fields

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


class BaseService(abc.ABC):
    """What every service has: the model's name, the limits and access rules, the request
    metrics; a subclass names its endpoints and its model calls."""

    def __init__(self, model_name: str, limits: Limits | None = None, access: Access | None = None):
        self.model_name, self.limits, self.access = model_name, limits or Limits(), access or Access()
        self.counts: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))  # the quantiles' window
        self.latency_sum: dict[str, float] = defaultdict(float)  # and count: of the requests answered
        self.latency_count: dict[str, int] = defaultdict(int)
        self.inflight = 0
        self.created = int(time.time())

    @abc.abstractmethod
    def endpoints(self) -> list[tuple[str, str, Callable]]:
        """(path, name, op) of each POST endpoint; op(body) -> a JSON-able dict or a Response."""

    def thumbnail(self, i: int) -> bytes:
        """GET /thumbnail/{i}: PNG of an indexed image (a service without an index has none)."""
        raise BadRequest(f"no indexed image {i}", 404)

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    def model_card(self) -> dict:
        """The served model's fields beyond OpenAI's in GET /v1/models."""
        return {}

    def batch_counts(self) -> dict[str, int]:
        """Model forward passes so far, by kind (for /metrics)."""
        return {}

    def models(self) -> dict:
        """GET /v1/models, in OpenAI's shape."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "clipper", **self.model_card()}]}

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
               [(f'{{kind="{k}"}}', v) for k, v in self.batch_counts().items()])
        family("inflight_requests", "gauge", "Requests doing model work now.", [("", self.inflight)])
        return "\n".join(lines) + "\n"

    # --- input checks every endpoint shares ---------------------------------------------------
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

    async def images_of(self, blobs: list[bytes], names: list[str], where: str, convert: Callable = lambda im: im) -> list:
        """Decoded images (each through `convert`), off the event loop: a large image takes a while;
        the whole request's pixels are counted from the headers before any is decoded."""
        def decode() -> list:
            try:
                total = sum(w * h for w, h in (image_size(b, name) for b, name in zip(blobs, names)))
            except ImageError as e:
                raise BadRequest(str(e)) from None
            if total > self.limits.max_request_pixels:
                raise BadRequest(f"{where}: {total} pixels in all, at most {self.limits.max_request_pixels} per "
                                 "request", 413)
            return [convert(self.image(b, name)) for b, name in zip(blobs, names)]

        return await asyncio.to_thread(decode)


class Service(BaseService):
    """A CLIP's endpoints: the model, the optional index, the batchers."""

    def __init__(self, model: CLIP, model_name: str, index_dir: str | None = None, limits: Limits | None = None,
                 max_batch: int = 32, access: Access | None = None, media_roots: list[str] | None = None):
        super().__init__(model_name, limits, access)
        self.model = model.eval()
        self.resize, self.normalize = model.preprocessing.resize, model.preprocessing.normalize
        self.tokenizer = model.tokenizer  # usage counts
        self.texts = Batcher(self._embed_texts, max_batch)
        self.images = Batcher(self._embed_images, max_batch)
        self.index = self.ids = None
        if index_dir is not None:
            self.index, self.locations, manifest = open_index(index_dir, model)
            # clients see ids relative to the embedded folder; where the bytes are is for thumbnails only
            self.ids = [_public(row, manifest.get("source")) for row in self.locations]
            # thumbnails are read from files under these folders only, whatever ids.jsonl says
            self.media_roots = [os.path.realpath(r) for r in media_roots or _embedded_folders(index_dir, manifest)]

    def endpoints(self) -> list[tuple[str, str, Callable]]:
        return [("/v1/embeddings", "embeddings", self.embeddings), ("/classify", "classify", self.classify),
                ("/caption", "caption", self.caption), ("/search", "search", self.search)]

    def health(self) -> dict:
        return {**super().health(), "caption": self.model.decoder is not None,
                "index": None if self.index is None else len(self.index)}

    def model_card(self) -> dict:
        """`classnames`: the labels the model was trained on, if any."""
        return {"embedding_dim": self.model.config.embed_dim, "classnames": self.model.config.classnames or []}

    def batch_counts(self) -> dict[str, int]:
        return {"text": self.texts.batches, "image": self.images.batches}

    # --- model calls (worker threads) -------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> list[torch.Tensor]:
        return list(embed_texts(self.model, texts, to_numpy=False))

    @torch.inference_mode()
    def _embed_images(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        emb = self.model.encode_image(self.normalize(torch.stack(pixels)), normalize=True).float()
        return list(emb)

    # --- input checks ------------------------------------------------------------------------
    async def pixels_of(self, values: Any, where: str, many: bool = True) -> list[torch.Tensor]:
        """Decoded and resized images (uint8), off the event loop: a large image takes a while.
        `many`: a list of images is taken (else one image only: a list is refused, never cut)."""
        if isinstance(values, list) and not many:
            raise BadRequest(f"{where}: one image (this endpoint answers for one; /v1/embeddings takes several)")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise BadRequest(f"{where}: empty list")
        if len(values) > self.limits.max_images:
            raise BadRequest(f"{where}: {len(values)} images, at most {self.limits.max_images} per request", 413)
        names = [f"{where}[{i}]" if len(values) > 1 else where for i in range(len(values))]
        blobs = [self.image_bytes(v, name) for v, name in zip(values, names)]
        return await self.images_of(blobs, names, where, self.resize)

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
        emb = await self.embed(pixels=await self.pixels_of(body.get("image"), "image", many=False))
        result = await asyncio.to_thread(classify_embeddings, self.model, emb, labels, templates, k)
        return {"labels": [{"label": label, "prob": round(p, 6)} for label, p in result.top[0]]}

    def generation_of(self, options: Any):
        """Generation settings, their types checked (no string for a number, no NaN) and bounded."""
        from ..generate import GenerationConfig

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
        from ..generate import generate

        _fields(body, "caption")
        cfg = self.generation_of(body.get("options") or {})
        prompt = body.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise BadRequest("prompt: one string (the same prompt continues every image's caption)")
            self.texts_of(prompt, "prompt", self.limits.max_label_chars)
        if ("image" in body) == ("images" in body):
            raise BadRequest("give 'image' or 'images' (one of them)")
        field = "image" if "image" in body else "images"
        pixels = self.normalize(torch.stack(await self.pixels_of(body[field], field)))
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
            if not isinstance(body["text"], str):
                raise BadRequest("text: one string (the query)")
            query = await self.embed(texts=self.texts_of(body["text"], "text"))
        else:
            query = await self.embed(pixels=await self.pixels_of(body["image"], "image", many=False))
        result = await asyncio.to_thread(self.index.search, query.numpy(), k)
        return {"results": [{"index": i, "score": round(s, 6), **self.ids[i]} for s, i in result.hits(0)]}

    def thumbnail(self, i: int, size: int = 128) -> bytes:
        if self.ids is None or not 0 <= i < len(self.ids):
            raise BadRequest(f"no indexed image {i}", 404)
        item = self._stored_image(i)
        try:
            im = decode_image(item.read(), item.id, self.limits.max_pixels)
        except (OSError, ImageError):  # the reason would show a path on this machine
            raise BadRequest(f"image {i} is no longer readable", 404) from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def _stored_image(self, i: int) -> ImageItem:
        """Where indexed image `i` is, from its ids.jsonl row: a file (never a URL or command) under
        the media roots, and a bounded byte range of it."""
        row = self.locations[i]
        path, offset, size = row.get("path", row["id"]), row.get("offset", 0), row.get("size", -1)
        if not (isinstance(path, str) and _whole_number(offset) and _whole_number(size) and offset >= 0
                and -1 <= size <= self.limits.max_body_bytes):
            raise BadRequest(f"image {i}: its ids.jsonl row has no usable path, offset and size", 404)
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.media_roots):
            raise BadRequest(f"image {i} is not under the folders this server reads (--media-root)", 404)
        if not os.path.isfile(real):  # gone, or a folder, a device or a FIFO (whose read would never end)
            raise BadRequest(f"image {i} is no longer readable", 404)
        if size < 0 and os.path.getsize(real) > self.limits.max_body_bytes:
            raise BadRequest(f"image {i} is larger than --max-body-bytes", 404)
        return ImageItem(row["id"], real, offset, size)


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


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _embedded_folders(index_dir: str, manifest: dict) -> list[str]:
    """The folders an index's thumbnails may come from: its own, and the one it was embedded from."""
    source = manifest.get("source")
    roots = [index_dir]
    if isinstance(source, str) and os.path.exists(source):
        roots.append(source if os.path.isdir(source) else os.path.dirname(source))
    return roots


def _public(row: dict, source: str | None) -> dict:
    """An ids.jsonl row as clients see it: its id relative to the embedded folder, and its caption;
    never where the file is on this machine."""
    ident = row["id"]
    if source and ident.startswith(source.rstrip("/") + "/"):
        ident = ident[len(source.rstrip("/")) + 1:]
    return {"id": ident, **({"caption": row["caption"]} if row.get("caption") is not None else {})}


