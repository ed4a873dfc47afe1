"""`/v1/chat/completions` in OpenAI's shape, for a vision-language model: messages whose content is
text or parts (`text`, `image_url` with a data: URL), answered whole or streamed as server-sent
events. Every field is checked against the limits before the model runs; one generation runs at a
time (the CPU is the bottleneck) on the model's own thread, up to `max_chat_queue` others wait for
it (more are a 503), and none of them holds a thread the rest of the server needs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..config import from_dict
from ..errors import ClipperError
from ..generate import GenerationConfig
from ..vlm import VLM
from ..vlm.model import cut_at_stop, stop_strings
from .body import BadRequest
from .config import Access, Limits
from .fetch import checked_url, fetch
from .service import BaseService, _fields

class ClientGone(Exception):
    """Raised in the generation's thread when the client of a streamed answer has gone away."""


# the request's sampling fields that GenerationConfig has under the same names (OpenAI's, and
# repetition_penalty); OpenAI's others are refused when set
_OPTIONS = ("temperature", "top_p", "seed", "repetition_penalty")


def _requested_tokens(body: dict):
    return body.get("max_completion_tokens", body.get("max_tokens"))


class ChatService(BaseService):
    def __init__(self, model: VLM, model_name: str, limits: Limits | None = None, access: Access | None = None):
        super().__init__(model_name, limits, access)
        self.model = model.eval()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat")
        self.queued = 0  # generations submitted and not finished
        self.generations = 0

    def endpoints(self) -> list[tuple[str, str, Callable]]:
        return [("/v1/chat/completions", "chat", self.chat)]

    def health(self) -> dict:
        return {**super().health(), "chat": True}

    def model_card(self) -> dict:
        return {"chat": True, "context_length": self.model.context_length}

    def batch_counts(self) -> dict[str, int]:
        return {"chat": self.generations}

    # --- the request -----------------------------------------------------------------------------
    def _messages(self, body: dict) -> tuple[list[dict], list[bytes | str]]:
        """The messages in the processor's form, and the images in order: their bytes (data: URLs)
        or their http(s) URLs (on an allowed host, fetched later)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a non-empty list of {role, content}")
        if len(messages) > self.limits.max_turns:
            raise BadRequest(f"messages: {len(messages)}, at most {self.limits.max_turns}", 413)
        out, images = [], []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
                raise BadRequest(f"{where}: an object with role and content")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                raise BadRequest(f"{where}.role: system, user or assistant")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                raise BadRequest(f"{where}.content: a string or a non-empty list of parts")
            converted = []
            for j, part in enumerate(parts):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str) or set(part) - {"type", "text"}:
                        raise BadRequest(f"{at}: a text part is {{type: text, text: string}}")
                    if len(text) > self.limits.max_text_chars:
                        raise BadRequest(f"{at}.text: {len(text)} characters, at most {self.limits.max_text_chars}",
                                         413)
                    converted.append({"type": "text", "text": text})
                elif kind == "image_url" and role == "user":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise BadRequest(f"{at}.image_url: {{url: a data: URL}}")
                    images.append(self.image_bytes(url, f"{at}.image_url") if url.startswith("data:") else
                                  checked_url(url, self.access.image_hosts, f"{at}.image_url"))
                    converted.append({"type": "image"})
                else:
                    raise BadRequest(f"{at}.type: text, or image_url in a user message")
            out.append({"role": role, "content": converted})
        if len(images) > 1:
            raise BadRequest(f"messages: {len(images)} images; this model answers about one image per chat", 413)
        return out, images

    def _generation(self, body: dict) -> GenerationConfig:
        limit = self.limits.max_new_tokens
        tokens = _requested_tokens(body)
        tokens = min(256, limit) if tokens is None else tokens  # unasked: cut to the room the prompt leaves
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= limit:
            raise BadRequest(f"max_tokens: an integer from 1 to {limit}", 413 if isinstance(tokens, int) else 400)
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest("n: 1 (one answer per request)")
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise BadRequest(f"{name}: not supported (repetition_penalty is)")
        options: dict[str, Any] = {"max_new_tokens": tokens,
                                   **{name: body[name] for name in _OPTIONS if body.get(name) is not None}}
        if "temperature" in options:  # given: sampling at it; 0: greedy, as OpenAI's (absent: the folder's default)
            options["do_sample"] = isinstance(options["temperature"], (int, float)) and options["temperature"] > 0
            if options["temperature"] == 0:
                options.pop("temperature")
        try:
            from_dict(GenerationConfig, options, "options")  # the types, one line each
            cfg = self.model.config.options(options)
        except ClipperError as e:
            raise BadRequest(str(e)) from None
        if cfg.seed is not None and not 0 <= cfg.seed < 2 ** 63:
            raise BadRequest("seed: an integer from 0 to 2**63 - 1")
        return cfg

    async def chat(self, body: dict) -> dict | Any:
        _fields(body, "chat")
        if body.get("model") is not None and body["model"] != self.model_name:
            raise BadRequest(f"model: {str(body['model'])[:100]!r} is not served here (GET /v1/models)", 404)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream: true or false")
        messages, blobs = self._messages(body)
        cfg = self._generation(body)
        try:
            stop = stop_strings(body.get("stop"))
        except ClipperError as e:
            raise BadRequest(str(e)) from None
        blobs = [b if isinstance(b, bytes) else await asyncio.to_thread(
            fetch, b, self.limits.max_body_bytes, self.limits.read_timeout_s, f"image {i}")
            for i, b in enumerate(blobs)]
        images = await self.images_of(blobs, [f"image {i}" for i in range(len(blobs))], "messages")
        processor = self.model.processor
        try:
            messages = await asyncio.to_thread(self.model.retrieving, messages, images)
            row = processor.encode(processor.render(messages), processor.image_texts(images))
        except ClipperError as e:
            raise BadRequest(str(e)) from None
        room = self.model.context_length - len(row)
        if _requested_tokens(body) is None and 0 < room < cfg.max_new_tokens:
            cfg = dataclasses.replace(cfg, max_new_tokens=room)
        if len(row) + cfg.max_new_tokens > self.model.context_length:
            raise BadRequest(f"messages: {len(row)} prompt tokens and max_tokens {cfg.max_new_tokens} pass the "
                             f"model's context of {self.model.context_length}", 413)
        if self.queued > self.limits.max_chat_queue:
            raise BadRequest("busy: too many chats waiting for the model", 503, {"Retry-After": "5"})
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": self.model_name}
        if not stream:
            ids = await self._submit(images, row, cfg, stop, None)
            text, stopped = cut_at_stop(processor.decode(ids), stop)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": self._finish(ids, cfg, stopped)}],
                    "usage": {"prompt_tokens": len(row), "completion_tokens": len(ids),
                              "total_tokens": len(row) + len(ids)}}
        return self._stream(head, images, row, cfg, stop)

    def _finish(self, ids: list[int], cfg: GenerationConfig, stopped: bool) -> str:
        return "length" if len(ids) >= cfg.max_new_tokens and not stopped else "stop"

    def _submit(self, images, row: list[int], cfg: GenerationConfig, stop: tuple[str, ...],
                emit: Callable[[str], None] | None):
        """The generation, queued for the model's thread: an awaitable of its ids."""
        def run() -> list[int]:
            try:
                self.generations += 1
                return self.model.respond(images, row, cfg, emit, stop=stop)
            finally:
                self.queued -= 1

        self.queued += 1
        return asyncio.wrap_future(self.worker.submit(run))

    def _stream(self, head: dict, images, row: list[int], cfg: GenerationConfig, stop: tuple[str, ...]):
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # the client went away: the generation stops at its next piece

        def emit(text: str) -> None:
            if gone.is_set():
                raise ClientGone
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        generation = self._submit(images, row, cfg, stop, emit)  # queued now, before the first event goes out

        async def run() -> None:
            try:
                ids = await generation
                stopped = cut_at_stop(self.model.processor.decode(ids), stop)[1]
                pieces.put_nowait(("end", self._finish(ids, cfg, stopped)))
            except ClientGone:
                pass
            except Exception as e:  # the client learns the generation failed, in the stream
                pieces.put_nowait(("error", str(e).splitlines()[0][:200]))

        def event(delta: dict, finish: str | None = None) -> str:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            worker = asyncio.ensure_future(run())
            try:
                yield event({"role": "assistant", "content": ""})
                while True:
                    item = await pieces.get()
                    if isinstance(item, tuple):
                        if item[0] == "error":
                            yield f"data: {json.dumps({'error': {'message': item[1]}})}\n\n"
                        else:
                            yield event({}, item[1])
                        break
                    yield event({"content": item})
                yield "data: [DONE]\n\n"
            finally:  # ended, or cancelled because the client went away
                gone.set()
            await worker

        return StreamingResponse(events(), media_type="text/event-stream")
