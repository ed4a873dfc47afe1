"""/v1/chat/completions for a vision-language model (issue #34): OpenAI's own Python client talks
to it with an image, whole and streamed, and gets what `VLM.chat` answers; malformed parts, remote
URLs, oversized images and too many tokens get a 4xx in under a second."""

import base64
import io
import json
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")

import clipper  # noqa: E402
from clipper.serve.chat import ChatService  # noqa: E402
from clipper.serve.config import Limits  # noqa: E402
from clipper.serve.testing import serve_in_thread  # noqa: E402
from conftest import demo_page  # noqa: E402
from test_vlm_llava import _image, _write_llava  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    _write_llava(folder, "clip", "llama", "default", -2)
    vlm = clipper.load(folder)
    url, stop = serve_in_thread(ChatService(vlm, "tiny-llava", Limits(max_new_tokens=16, max_pixels=200 * 200,
                                                                      max_turns=8)))
    yield {"url": url, "vlm": vlm}
    stop()


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _post(server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _user(text: str, image=None) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts = [{"type": "image_url", "image_url": {"url": _data_url(image)}}] + parts
    return [{"role": "user", "content": parts}]


def test_openai_client_whole_and_streamed(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    expected = server["vlm"].chat(_image(), "describe the photo", max_new_tokens=8)
    out = client.chat.completions.create(model="tiny-llava", messages=_user("describe the photo", _image()),
                                         max_tokens=8)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 16
    assert out.choices[0].finish_reason in ("stop", "length")
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny-llava", messages=_user("describe the photo", _image()), max_tokens=8, stream=True)]
    assert "".join(pieces).strip() == expected.strip() and len(pieces) > 2
    text_only = client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "a cat"}],
                                               max_tokens=4)
    assert text_only.choices[0].message.content is not None
    sampled = [client.chat.completions.create(model="tiny-llava", messages=_user("a cat", _image()), max_tokens=6,
                                              temperature=0.9, seed=3).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed gives the same answer
    stop = " " + expected.split()[1]
    for streamed in (False, True):  # OpenAI's stop: the answer ends before it
        out = client.chat.completions.create(model="tiny-llava", messages=_user("describe the photo", _image()),
                                             max_tokens=8, stop=stop, stream=streamed)
        if streamed:
            chunks = list(out)
            text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert text == expected[:expected.find(stop)] and finish == "stop"


@pytest.mark.parametrize("body,status,match", [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400, "type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
     400, "only data: URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
     400, "base64"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 413, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, 413, "at most 8"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, 413, "characters"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n: 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "not served here"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "unknown field"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 9}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [3]}, 400, "stop"),
])
def test_bad_requests_get_4xx_fast(server, body, status, match):
    t0 = time.perf_counter()
    code, out = _post(server, body)
    assert code == status and match in out["error"]["message"] and time.perf_counter() - t0 < 1


def test_oversized_and_extra_images_refused(server):
    from PIL import Image

    t0 = time.perf_counter()
    big = Image.new("RGB", (400, 400))
    code, out = _post(server, {"messages": _user("a cat", big)})
    assert code == 413 and "pixel" in out["error"]["message"]
    two = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_image())}},
                                                     {"type": "image_url", "image_url": {"url": _data_url(_image(1))}},
                                                     {"type": "text", "text": "a cat"}]}]}
    code, out = _post(server, two)
    assert code == 413 and "one image" in out["error"]["message"] and time.perf_counter() - t0 < 2
    status = urllib.request.urlopen(server["url"] + "/health", timeout=5).status
    assert status == 200


def test_every_field_with_hostile_values_gets_no_500(server):
    """Each field of the chat request, and of a message and its parts, set to values of every type
    (huge numbers, surrogates, nesting), the rest valid: never a 5xx, and the server still answers."""
    from clipper.serve.schema import REQUESTS

    values = [None, True, False, -1, 0, 1, 2 ** 70, 1e308, -1e308, 0.5, "x", "", "\ud800", "a" * 3000, [], {},
              [1], ["\ud800"], [None], {"a": 1}, [[[]]], {"url": 5}, {"type": "text"}]
    base = {"messages": [{"role": "user", "content": "a cat"}], "max_tokens": 2}
    cases = [{**base, field: v} for field in REQUESTS["chat"].model_fields for v in values]
    cases += [{**base, "messages": [{"role": "user", "content": v}]} for v in values]
    cases += [{**base, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": v}]}]}
              for v in values]
    cases += [{**base, "messages": [v]} for v in values]
    statuses = []
    for body in cases:
        raw = json.dumps(body).encode("utf-8", "surrogatepass").replace(b"\xed\xa0\x80", b"\\ud800")
        request = urllib.request.Request(server["url"] + "/v1/chat/completions", raw,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status < 500, body
        statuses.append(status)
    assert 200 in statuses and 400 in statuses and len(cases) > 300
    assert urllib.request.urlopen(server["url"] + "/health", timeout=5).status == 200


def test_chat_panel_in_headless_chromium(tmp_path):
    """The demo page of a VLM server is a chat: an image, a question, the answer streamed in as
    text; a second question continues the chat. What the model writes is never run as HTML."""
    payload = "<svg/onload=window.__pwned=1><img src=x onerror=window.__pwned=2>"
    _write_llava(tmp_path / "m", "clip", "llama", "default", -2)
    vlm = clipper.load(tmp_path / "m")
    decode = vlm.processor.decode
    vlm.processor.decode = lambda ids: payload + decode(ids) if ids else ""  # a model that writes markup
    _image().save(tmp_path / "a.png")
    url, stop = serve_in_thread(ChatService(vlm, "tiny-llava", Limits(max_new_tokens=16)))  # answers fit its context
    try:
        with demo_page(url, "chat") as page:
            assert page.locator("#chat-panel").is_visible() and not page.locator("#search").is_visible()
            page.set_input_files("#chat-file", str(tmp_path / "a.png"))
            page.wait_for_function("document.getElementById('chat-preview').style.display === 'block'")
            page.fill("#chat-input", "describe the photo")
            page.click("#chat-form button")
            page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 1 && "
                                   "document.querySelector('.turn.assistant').textContent.length > 0", timeout=20000)
            page.wait_for_timeout(500)  # the rest of the stream; an injected element would have fired by now
            answer = page.locator(".turn.assistant").first.inner_text()
            assert answer.startswith(payload) and page.evaluate("window.__pwned") is None
            page.fill("#chat-input", "what is red")
            page.click("#chat-form button")
            page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 2", timeout=20000)
            assert page.locator(".turn.user").count() == 2 and page.locator("#chat-error").inner_text() == ""
    finally:
        stop()


def test_a_stream_whose_client_goes_away_stops_generating(tmp_path):
    """The client closes the connection after the first event: the generation stops at its next
    piece instead of running to max_tokens, and the server goes on answering."""
    import socket

    from clipper.serve.chat import ClientGone

    _write_llava(tmp_path, "clip", "llama", "default", -2)
    vlm = clipper.load(tmp_path)
    vlm.codec.stop_ids = (10 ** 6,)  # an end it never writes: unstopped, it would run all 200 tokens
    outcome = []
    respond = vlm.respond

    def counted(*args, **kwargs):
        try:
            ids = respond(*args, **kwargs)
        except ClientGone:
            outcome.append("gone")
            raise
        outcome.append(len(ids))
        return ids
    vlm.respond = counted
    service = ChatService(vlm, "tiny-llava", Limits(max_new_tokens=200))
    url, stop = serve_in_thread(service)
    try:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "a cat"}], "max_tokens": 200,
                           "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"data: " in s.recv(4096)
        deadline = time.monotonic() + 20
        while service.queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcome == ["gone"]  # stopped, not run to its 200 tokens
        status, out = _post({"url": url}, {"messages": [{"role": "user", "content": "a cat"}], "max_tokens": 3})
        assert status == 200 and out["usage"]["completion_tokens"] == 3 and outcome == ["gone", 3]
    finally:
        stop()


def test_remote_image_urls_only_from_allowed_hosts(tmp_path):
    """--image-host: a chat's http image URL on an allowed host is fetched (the answer equals the
    data: URL's); other hosts, redirects, missing and oversized images get 4xx in < 1 s."""
    import http.server
    import threading

    image = io.BytesIO()
    _image().save(image, format="PNG")

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image.getvalue())))
                self.end_headers()
                self.wfile.write(image.getvalue())
            elif self.path == "/big.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * (1 << 16))
            elif self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _write_llava(tmp_path, "clip", "llama", "default", -2)
    vlm = clipper.load(tmp_path)
    from clipper.serve.config import Access

    url, stop = serve_in_thread(ChatService(vlm, "tiny-llava", Limits(max_new_tokens=16, max_body_bytes=1 << 15,
                                                                      max_buffered_bytes=1 << 16),
                                            Access(image_hosts=("127.0.0.1",))))
    try:
        server = {"url": url}

        def ask(image_url: str) -> tuple[int, dict]:
            return _post(server, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "describe the photo"}]}],
                "max_tokens": 6})

        code, out = ask(base + "/a.png")
        assert code == 200 and out["choices"][0]["message"]["content"] == vlm.chat(_image(), "describe the photo",
                                                                                    max_new_tokens=6)
        for path, status, match in ((f"http://localhost:{httpd.server_address[1]}/a.png", 403, "not a host"),
                                    (base + "/moved.png", 400, "redirect"), (base + "/none.png", 400, "HTTP 404"),
                                    (base + "/big.png", 413, "bytes"), ("ftp://127.0.0.1/a.png", 400, "http(s)"),
                                    ("http://user:pw@127.0.0.1/a.png", 400, "credentials")):
            t0 = time.perf_counter()
            code, out = ask(path)
            assert code == status and match in out["error"]["message"] and time.perf_counter() - t0 < 1, (path, out)
    finally:
        stop()
        httpd.shutdown()
