"""What stands in front of `clipper serve`'s application: the HTTP connection guard (request
headers bounded in time and bytes, connections that have not finished them counted) and the ASGI
admission (Host, cross-site requests, the API key, CORS, open requests, declared body sizes).
Both act before any body is read or any framework work is done."""

from __future__ import annotations

import asyncio
import hmac
import json
import resource
from collections import OrderedDict

from .config import Access, Limits

# no API key and no cross-site refusal: the monitor, and the page (it asks for the key; a link from
# another site may open it)
OPEN_PATHS = ("/health", "/")
UNCOUNTED_PATHS = ("/health", "/metrics")  # not counted in max_connections: a full server answers its monitor
EVICT_AFTER_S = 1.0  # past max_connections unfinished headers, those waiting this long are closed first


class Admission:
    """ASGI wrapper. In order: the Host must be one this server answers to (DNS rebinding: 421); a
    cross-site request (an `Origin` other than this server's, or `Sec-Fetch-Site: cross-site`) is
    refused (403) unless its origin is in `access.cors_origins`: multipart and plain POSTs need no
    CORS preflight, so without this any page a user opens could send them; with an API key, every
    path but /health and the page needs it (`Authorization: Bearer KEY`, the scheme in any case, or
    `X-API-Key: KEY`, given once); at most `max_connections` requests open at once (503 with
    Retry-After; /health and /metrics always pass, so that a monitor sees a full server as busy, not
    dead) and a declared body over 4 times `max_body_bytes` refused (413)."""

    def __init__(self, app, limits: Limits, access: Access):
        self.app, self.limits, self.access, self.open = app, limits, access, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, []).append(value)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            return await self.refuse(send, *refusal)
        origin = _one(headers, b"origin")
        if origin is not None and origin.decode("latin-1") in self.access.cors_origins:
            if scope["method"] == "OPTIONS":
                return await self.preflight(send, origin)
            send = _with_cors(send, origin)
        if scope["path"] in UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        declared = _one(headers, b"content-length")
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

    def refusal(self, scope, headers: dict[bytes, list[bytes]]) -> tuple | None:
        """(status, message[, headers]) of a request this server does not take from this client, or None."""
        access, path = self.access, scope["path"]
        if path == "/health":
            return None
        host = (_one(headers, b"host") or b"").decode("latin-1")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if access.allowed_hosts and hostname not in access.allowed_hosts:
            return 421, f"Host {host[:100]!r} is not one this server answers to"
        origin = _one(headers, b"origin")
        origin_text = None if origin is None else origin.decode("latin-1")
        if path not in OPEN_PATHS and origin_text not in access.cors_origins:
            own = f"{scope.get('scheme', 'http')}://{host}"
            if (origin_text is not None and origin_text != own) or _one(headers, b"sec-fetch-site") == b"cross-site":
                return 403, (f"cross-site request refused (Origin {str(origin_text)[:100]!r}); a server that other "
                             "sites may call names them with --cors-origin")
        if access.api_key is not None and path not in OPEN_PATHS and not (
                scope["method"] == "OPTIONS" and origin_text in access.cors_origins):
            given = headers.get(b"authorization", []) + headers.get(b"x-api-key", [])
            if len(given) > 1:
                return 400, "send the API key once (one Authorization or X-API-Key header)"
            key = b""
            if headers.get(b"x-api-key"):
                key = given[0].strip()
            elif given:
                scheme, _, token = given[0].strip().partition(b" ")
                key = token.strip() if scheme.lower() == b"bearer" else b""
            if not hmac.compare_digest(key, access.api_key.encode()):
                return 401, "not authorised: send Authorization: Bearer <api key>", [(b"www-authenticate", b"Bearer")]
        return None

    @staticmethod
    async def refuse(send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"error": {"message": message, "status": status}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def preflight(send, origin: bytes) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST"),
            (b"access-control-allow-headers", b"authorization, content-type, x-api-key"),
            (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})


def _one(headers: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    values = headers.get(name)
    return values[0] if values else None


def _with_cors(send, origin: bytes):
    async def cors_send(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"access-control-allow-origin", origin),
                                              (b"vary", b"Origin")]}
        await send(message)
    return cors_send


def header_guard(limits: Limits):
    """uvicorn's httptools protocol with what it lacks (issue #37): a request's headers must arrive
    within `read_timeout_s` of its first byte (of the connection, for the first request) and within
    `max_header_bytes`, else 408 / 431 and the connection closes; and the connections that have not
    finished their headers are counted: past `max_connections` of them (or near the process's limit
    of open files) the ones waiting longest (over EVICT_AFTER_S) are closed, so that silent sockets
    cannot shut out the rest (uvicorn's keep-alive timeout covers only the idle time between
    requests)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    soft_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    most_waiting = limits.max_connections if soft_files == resource.RLIM_INFINITY else \
        max(16, min(limits.max_connections, soft_files - 64))
    waiting: OrderedDict[int, tuple["GuardedProtocol", float]] = OrderedDict()  # the oldest first

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._dropping: int | None = None  # bytes read and dropped after a refusal
            self._await_headers()

        def _await_headers(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(limits.read_timeout_s, self._give_up, 408,
                                                   b"request headers not received in time")
                now = self.loop.time()
                waiting[id(self)] = (self, now)
                # a burst of connections is not an attack: only those waiting a while are closed
                while len(waiting) > most_waiting and next(iter(waiting.values()))[1] < now - EVICT_AFTER_S:
                    _, (oldest, _) = waiting.popitem(last=False)
                    oldest._give_up(408, b"request headers not received in time (server full)")

        def _headers_done(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._header_bytes = 0
            waiting.pop(id(self), None)

        def _give_up(self, status: int, message: bytes) -> None:
            """Answer `status` and close: at once after a timeout (the client is silent); a second
            later for a client still sending (closing on unread bytes resets the connection, and
            the client would lose the answer), reading and dropping up to 1 MiB meanwhile."""
            self._headers_done()
            if not self.transport.is_closing() and self._dropping is None:
                reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
                self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                                     b"connection: close\r\n\r\n%s" % (status, reason, len(message), message))
                if status == 408:
                    self.transport.close()
                else:
                    self._dropping = 0
                    self.loop.call_later(1.0, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self._dropping is not None:
                self._dropping += len(data)
                if self._dropping > 1 << 20:
                    self.transport.close()
                return
            super().data_received(data)
            if self._timer is not None:  # the headers are still not complete: all of this was header bytes
                self._header_bytes += len(data)
                if self._header_bytes > limits.max_header_bytes:
                    self._give_up(431, b"request headers too large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return GuardedProtocol
