"""The FastAPI application of `clipper serve` around a `Service`, behind the guard (`guard`), and
uvicorn running it. (No `from __future__ import annotations` here: FastAPI reads the handlers'
annotations, and `Request` is imported inside `create_app`.)"""

import asyncio
import gc
import time
from pathlib import Path

from ..errors import ClipperError
from .body import BadRequest, BodyBudget, parse_body, read_body
from .guard import Admission, header_guard
from .service import BaseService

DEMO_PAGE = Path(__file__).with_name("demo.html")


def create_app(service: BaseService):
    """The FastAPI application around `service`."""
    from fastapi import FastAPI, Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    from ..version import __version__
    from .schema import components, request_body

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
            limits = service.limits
            # parsed off the event loop: a 16 MB body takes a while, and /health must not wait for it
            body = await asyncio.to_thread(parse_body, raw, content_type,
                                           limits.max_images + limits.max_texts + limits.max_templates + 8)
            result = await op(body)
            return result if isinstance(result, Response) else JSONResponse(result)
        except ClipperError as e:  # an option or input the library refused
            service.errors[name] += 1
            return refusal(BadRequest(str(e)))
        except BadRequest as e:
            service.errors[name] += 1
            return refusal(e)
        except (RecursionError, OverflowError, MemoryError) as e:  # an input past what the model code can take
            service.errors[name] += 1
            status = 413 if isinstance(e, MemoryError) else 400
            return refusal(BadRequest(f"{name}: the request is too large or extreme to process ({type(e).__name__})",
                                      status))
        finally:
            service.inflight -= working
            elapsed = time.perf_counter() - t0
            service.latency[name].append(elapsed)
            service.latency_sum[name] += elapsed
            service.latency_count[name] += 1

    def endpoint(name: str, op):
        async def run(request: Request):
            return await handle(request, name, op)
        return run

    for path, name, op in service.endpoints():
        app.post(path, name=name, openapi_extra=request_body(name))(endpoint(name, op))

    @app.get("/thumbnail/{i}")
    async def thumbnail(i: int):
        try:
            return Response(await asyncio.to_thread(service.thumbnail, i), media_type="image/png")
        except BadRequest as e:
            return refusal(e)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        try:
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

    return Admission(app, service.limits, service.access)


def serve(service: BaseService, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    # The model, torch and the framework are ~400,000 objects that live as long as the server; left to
    # the cyclic collector, each full collection walks them all (~140 ms) on the event loop, and a
    # flood of connections triggers them. Frozen, a collection walks only what requests allocated.
    gc.freeze()
    # SIGTERM: stop taking requests, give running ones 5 s; idle keep-alive connections close after 5 s
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                timeout_keep_alive=5, http=header_guard(service.limits))


