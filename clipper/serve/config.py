"""The settings of `clipper serve` (request limits and access), apart from the server so that the
CLI can make their flags without importing it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import setting
from ..errors import ConfigError


@dataclass
class Limits:
    """What one request may ask for; each has a `clipper serve` flag. A request over a limit gets a
    4xx with the reason before any model work is done."""
    max_body_bytes: int = setting(16 << 20, "request body bytes (Content-Length checked before reading)")
    max_buffered_bytes: int = setting(64 << 20, "body bytes held at once by all the requests being received (at "
                                                 "least --max-body-bytes); past it a body over 64 KiB waits (TCP "
                                                 "backpressure), and gets 503 with Retry-After if its read "
                                                 "timeout passes while waiting")
    read_timeout_s: float = setting(10.0, "seconds a client has to send its request headers, and then its whole "
                                          "body (then 408)")
    max_header_bytes: int = setting(64 << 10, "bytes of one request's headers (then 431)")
    max_inflight: int = setting(512, "requests doing model work at once (the batchers queue them); more get 503 "
                                     "with Retry-After")
    max_connections: int = setting(1024, "requests open at once, being received or worked on (/health and "
                                         "/metrics excepted: a full server still answers its monitor); more "
                                         "get 503 with Retry-After")
    max_images: int = setting(16, "images per request")
    max_pixels: int = setting(40_000_000, "pixels per image")
    max_request_pixels: int = setting(100_000_000, "pixels of all the images of one request")
    max_texts: int = setting(256, "texts per request")
    max_text_chars: int = setting(2000, "characters per text")
    max_labels: int = setting(1000, "labels per /classify request")
    max_templates: int = setting(64, "templates per /classify request")
    max_prompts: int = setting(8192, "labels x templates per /classify request")
    max_label_chars: int = setting(200, "characters per label, template or caption prompt")
    max_beams: int = setting(8, "num_beams and num_return_sequences of /caption")
    max_k: int = setting(100, "results per /search request")
    max_new_tokens: int = setting(1024, "tokens one /v1/chat/completions answer may ask for (max_tokens)")
    max_turns: int = setting(64, "messages per /v1/chat/completions request")
    max_chat_queue: int = setting(16, "chat requests waiting for the model (one generates at a time); more get "
                                      "503 with Retry-After")

    def __post_init__(self) -> None:
        for f in fields(self):  # a zero would refuse (or, for the upload slots, stall) every request
            if not getattr(self, f.name) > 0:
                raise ConfigError(f"serve: --{f.name.replace('_', '-')} must be positive, got {getattr(self, f.name)}")
        if self.max_buffered_bytes < self.max_body_bytes:  # else a body near the limit would wait for all others
            raise ConfigError(f"serve: --max-buffered-bytes ({self.max_buffered_bytes}) must be at least "
                              f"--max-body-bytes ({self.max_body_bytes})")



@dataclass
class Access:
    """Who may call: a bearer token (`--api-key` or CLIPPER_API_KEY), the Host names a request
    may carry (DNS rebinding: a page elsewhere cannot reach a loopback server through its name),
    the origins of other sites whose pages may send requests (`--cors-origin`), and the hosts a
    chat's image URLs may name (`--image-host`)."""
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")  # empty: any
    cors_origins: tuple[str, ...] = ()  # the other sites' pages that may call (scheme://host[:port])
    image_hosts: tuple[str, ...] = ()  # hosts the server fetches http(s) image URLs from ("*": any; none: data: only)
