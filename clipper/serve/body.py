"""Request bodies of `clipper serve`: read within a size, a time and a shared memory budget, then
parsed (JSON, or multipart/form-data by `serve_multipart`) into a dict whose strings are all text.
Every failure is a `BadRequest`: a status and a one-line reason."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from .config import Limits
from .multipart import FormError, parse_form
from .schema import FORM_JSON_FIELDS


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


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
    times the limit was refused before, by `Admission`), held within `budget`. A body over the
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


def form_body(raw: bytes, content_type: str, max_parts: int) -> dict:
    """A multipart/form-data body as a JSON body would be: files as bytes, fields as text (the
    non-text ones, FORM_JSON_FIELDS, read as JSON), a repeated name as a list."""
    try:
        parts = parse_form(raw, content_type, max_parts)
    except FormError as e:
        raise BadRequest(str(e), e.status) from None
    body: dict[str, list] = {}
    for part in parts:
        value: Any = part.data
        if not part.is_file:  # a field, not a file
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"{part.name}: not UTF-8 text") from None
            if part.name in FORM_JSON_FIELDS:
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):
                    raise BadRequest(f"{part.name}: not valid JSON") from None
        body.setdefault(part.name, []).append(value)
    out = {name: values[0] if len(values) == 1 else values for name, values in body.items()}
    if "modality" not in out and any(isinstance(v, bytes) for v in body.get("input", [])):
        out["modality"] = "image"  # files to embed are images
    return out


# a JSON escape of a UTF-16 surrogate: only bodies holding one can decode to a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def parse_body(raw: bytes, content_type: str, max_parts: int) -> dict:
    """A request body (JSON or multipart/form-data) as a dict whose strings are all valid text."""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        body = form_body(raw, content_type, max_parts)
    else:
        try:
            text = raw.decode("utf-8")
            body = json.loads(text)
        except UnicodeDecodeError:
            raise BadRequest("body: not UTF-8 text") from None
        except (ValueError, RecursionError):  # malformed, too deep, or an integer of thousands of digits
            raise BadRequest("body: not valid JSON (or nested too deep, or a number too long)") from None
        if _SURROGATE_ESCAPE.search(text):
            _check_text(body)
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


def _check_text(body: Any) -> None:
    """Refuse a lone UTF-16 surrogate ("\\ud800") anywhere in a parsed JSON body: no encoder takes it."""
    stack = [(body, "body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f"{where}: holds a lone surrogate (\\ud800-\\udfff), not text") from None
        elif isinstance(value, dict):  # the names are checked first: they name the values in messages
            stack.extend((v, k if where == "body" else f"{where}.{k}") for k, v in value.items())
            stack.extend((k, "a field name") for k in value)
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
