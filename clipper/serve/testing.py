"""A server on a free loopback port in a thread, and waiting for one to answer: for tests,
benchmarks and scripts."""

from __future__ import annotations

import threading
import time
from typing import Callable

from .app import create_app
from .guard import header_guard
from .service import BaseService


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


def serve_in_thread(service: BaseService) -> tuple[str, Callable[[], None]]:
    """Start the service on a free loopback port in a thread: (base URL, stop function)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=free_port(),
                                           log_level="warning", http=header_guard(service.limits)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    wait_until_up(url)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return url, stop
