"""`clipper serve` with a real server on 127.0.0.1: every endpoint, bad inputs (4xx, and the
server keeps serving), 50 concurrent embedding requests equal to single ones, and the demo page
in headless Chromium."""

import base64
import io
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import clipper  # noqa: E402
from clipper.embed import embed_images, embed_texts  # noqa: E402
from clipper.embed_dir import embed_folder  # noqa: E402
from clipper.index import Index  # noqa: E402
from clipper.serve.config import Limits  # noqa: E402
from clipper.serve.service import Service  # noqa: E402
from clipper.serve.testing import serve_in_thread  # noqa: E402
from conftest import RGB_TINY, demo_page, indexed_captioner, noise_png  # noqa: E402



_png = noise_png


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (an image bomb: only the header is read)."""
    import struct
    import zlib

    png = _png(0)
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = indexed_captioner(tmp, 6)
    model.config.classnames = ["red", "blue", "green"]  # as training on a labelled set records them
    service = Service(model, "tiny", str(tmp / "emb"), Limits(max_images=4, max_pixels=300 * 300,
                                                              max_body_bytes=1 << 20, read_timeout_s=1.0))
    url, stop = serve_in_thread(service)
    yield {"url": url, "model": model, "tmp": tmp, "service": service}
    stop()


def call(server, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server["url"] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
            return r.status, (json.loads(payload) if r.headers.get_content_type() == "application/json" else payload)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_page_and_metrics(server):
    status, health = call(server, "/health")
    assert status == 200 and health["caption"] and health["index"] == 6
    status, page = call(server, "/")
    assert status == 200 and b"clipper" in page and b"/classify" in page
    call(server, "/v1/embeddings", {"input": "x"})
    with urllib.request.urlopen(server["url"] + "/metrics") as r:
        assert r.headers.get_content_type() == "text/plain"
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # the parser refuses malformed text
    requests = {s.labels["endpoint"]: s.value for s in families["clipper_requests"].samples}
    assert families["clipper_requests"].type == "counter" and requests["embeddings"] >= 1
    latency = families["clipper_request_duration_seconds"]
    assert latency.type == "summary" and {s.labels.get("quantile") for s in latency.samples} >= {"0.5", "0.95"}
    count = [s.value for s in latency.samples if s.name.endswith("_count") and s.labels["endpoint"] == "embeddings"]
    assert count == [requests["embeddings"]] and all(s.value > 0 for s in latency.samples)
    assert {s.labels["kind"] for s in families["clipper_batches"].samples} == {"text", "image"}


def test_embeddings_in_the_openai_shape(server):
    status, out = call(server, "/v1/embeddings", {"input": ["a dog", "a red square"], "modality": "text"})
    assert status == 200 and out["object"] == "list" and len(out["data"]) == 2 and out["usage"]["prompt_tokens"] > 0
    expected = embed_texts(server["model"], ["a dog", "a red square"])
    assert np.allclose([d["embedding"] for d in out["data"]], expected, atol=1e-5)
    png = _png(0)
    status, out = call(server, "/v1/embeddings", {"input": ["data:image/png;base64," + _b64(png)], "modality": "image"})
    expected = embed_images(server["model"], [Image.open(io.BytesIO(png))])
    assert status == 200 and np.allclose(out["data"][0]["embedding"], expected[0], atol=1e-5)


def test_classify_caption_search_thumbnail(server):
    png = _b64(_png(3))
    status, out = call(server, "/classify", {"image": png, "labels": ["red", "blue", "green"], "k": 2})
    assert status == 200 and len(out["labels"]) == 2 and abs(sum(x["prob"] for x in out["labels"])) <= 1 + 1e-6
    status, out = call(server, "/caption", {"image": png, "options": {"num_beams": 2}})
    assert status == 200 and isinstance(out["captions"][0], str)
    status, out = call(server, "/search", {"image": png, "k": 3})
    assert status == 200 and out["results"][0]["id"].endswith("3.png") and out["results"][0]["score"] > 0.99
    status, out = call(server, "/search", {"text": "a red square", "k": 6})
    assert status == 200 and len(out["results"]) == 6
    status, thumb = call(server, f"/thumbnail/{out['results'][0]['index']}")
    assert status == 200 and thumb[:8] == b"\x89PNG\r\n\x1a\n"


def test_openai_client_reads_embeddings_float_and_base64(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    texts = ["a dog", "a red square"]
    expected = embed_texts(server["model"], texts)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # the client asks for base64 unless told otherwise, and decodes it itself
    default = client.embeddings.create(model="tiny", input=texts)
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float", dimensions=32)
    for out in (default, floats):
        assert np.allclose([d.embedding for d in out.data], expected, atol=1e-6)
    raw = client.embeddings.create(model="tiny", input=texts, encoding_format="base64")  # left encoded
    assert np.array_equal(np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data]),
                          np.array([d.embedding for d in floats.data], dtype=np.float32))
    with pytest.raises(openai.BadRequestError, match="have 32"):
        client.embeddings.create(model="tiny", input=texts, dimensions=16)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input=texts)


def test_models_and_openapi_schemas(server):
    status, models = call(server, "/v1/models")
    assert status == 200 and models["data"][0] | {"created": 0} == {
        "id": "tiny", "object": "model", "created": 0, "owned_by": "clipper", "embedding_dim": 32,
        "classnames": ["red", "blue", "green"]}
    assert call(server, "/v1/models/tiny")[1]["id"] == "tiny" and call(server, "/v1/models/other")[0] == 404
    status, spec = call(server, "/openapi.json")
    schemas = spec["components"]["schemas"]
    for path, name in (("/v1/embeddings", "EmbeddingsRequest"), ("/classify", "ClassifyRequest"),
                       ("/caption", "CaptionRequest"), ("/search", "SearchRequest")):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{name}"
        assert content["multipart/form-data"]["schema"]["$ref"] == f"#/components/schemas/{name}Form"
        assert schemas[name]["additionalProperties"] is False and schemas[name]["properties"]
    assert schemas["ClassifyRequest"]["required"] == ["image", "labels"]
    assert "num_beams" in schemas["GenerationOptions"]["properties"]
    assert schemas["ClassifyRequestForm"]["properties"]["image"]["anyOf"][0]["format"] == "binary"
    status, page = call(server, "/docs")
    assert status == 200 and b"swagger" in page.lower()


def test_multipart_uploads_equal_json_bodies(server):
    requests = pytest.importorskip("requests")
    png = _png(3)
    url = server["url"]
    got = requests.post(url + "/classify", files={"image": ("3.png", png, "image/png")},
                        data={"labels": "red, blue, green", "k": "2"}, timeout=30)
    assert got.status_code == 200 and got.json() == call(server, "/classify", {"image": _b64(png),
                                                                              "labels": ["red", "blue", "green"], "k": 2})[1]
    two = [("input", ("a.png", png, "image/png")), ("input", ("b.png", _png(4), "image/png"))]
    got = requests.post(url + "/v1/embeddings", files=two, timeout=30)
    expected = embed_images(server["model"], [Image.open(io.BytesIO(png)), Image.open(io.BytesIO(_png(4)))])
    assert got.status_code == 200 and np.allclose([d["embedding"] for d in got.json()["data"]], expected, atol=1e-5)
    got = requests.post(url + "/caption", files={"image": ("3.png", png, "image/png")},
                        data={"options": json.dumps({"num_beams": 2})}, timeout=30)
    assert got.json() == call(server, "/caption", {"image": _b64(png), "options": {"num_beams": 2}})[1]
    got = requests.post(url + "/search", files={"image": ("3.png", png, "image/png")}, data={"k": "3"}, timeout=30)
    assert got.status_code == 200 and got.json()["results"][0]["id"].endswith("3.png")
    for files, data, message in (({"image": ("x.png", b"not an image", "image/png")}, {"labels": "a"}, "not an image"),
                                 ({"image": ("x.png", png, "image/png")}, {"labels": "a", "k": "two"}, "k: not valid JSON"),
                                 ({"image": ("x.png", png, "image/png")}, {"labels": "a", "beams": "3"}, "unknown field")):
        got = requests.post(url + "/classify", files=files, data=data, timeout=30)
        assert got.status_code == 400 and message in got.json()["error"]["message"]
    got = requests.post(url + "/classify", data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}, timeout=30)
    assert got.status_code == 400 and "multipart" in got.json()["error"]["message"]


@pytest.mark.parametrize("path,body,raw,status,message", [
    ("/v1/embeddings", {"input": _b64(b"not an image at all"), "modality": "image"}, None, 400, "not an image"),
    ("/v1/embeddings", {"input": "x", "modality": "audio"}, None, 400, "modality"),
    ("/v1/embeddings", {"input": []}, None, 400, "empty list"),
    ("/v1/embeddings", {"input": ["x" * 3000]}, None, 413, "characters"),
    ("/v1/embeddings", None, b"{not json", 400, "not valid JSON"),
    ("/v1/embeddings", {"input": [_b64(_png(1))] * 5, "modality": "image"}, None, 413, "at most 4"),
    ("/classify", {"image": _b64(_png(1, (400, 400))), "labels": ["a"]}, None, 413, "pixel limit"),
    ("/classify", {"image": _b64(_png(1)), "labels": []}, None, 400, "labels"),
    ("/search", {"text": "a", "image": _b64(_png(1))}, None, 400, "one of them"),
    ("/search", {"text": "a", "k": 0}, None, 400, "k:"),
    ("/caption", {"image": _b64(_png(1)), "options": {"beams": 3}}, None, 400, "options"),
    ("/caption", {"image": _b64(_png(1)), "options": {"num_beams": 2.5}}, None, 400, "num_beams"),
    ("/caption", {"image": _b64(_png(1)), "options": {"do_sample": "false"}}, None, 400, "do_sample"),
    ("/caption", {"image": _b64(_png(1)), "options": {"seed": "7"}}, None, 400, "seed"),
    ("/caption", {"image": _b64(_png(1)), "options": {"num_beams": 5000}}, None, 413, "at most 8"),
    ("/caption", {"image": _b64(_png(1)), "options": {"use_cache": False}}, None, 400, "use_cache"),
    ("/caption", {"image": _b64(_png(1)), "num_beams": 3}, None, 400, "unknown field"),
    ("/caption", None, b'{"image": "x", "options": {"temperature": NaN}}', 400, "temperature"),
    ("/caption", {"image": _b64(_png(1)), "prompt": "a" * 201}, None, 413, "at most 200"),
    ("/classify", {"image": _b64(_png(1)), "labels": ["a"], "templates": ["{} {"]}, None, 400, "other braces"),
    ("/classify", {"image": _b64(_png(1)), "labels": ["x" * 200_000]}, None, 413, "at most 200"),
    ("/classify", {"image": _b64(_png(1)), "labels": ["a"] * 1000, "templates": ["{}"] * 64}, None, 413, "prompts"),
    ("/search", None, b'{"text": "a", "k": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("/search", None, b"[" * 10000 + b"]" * 10000, 400, "not valid JSON"),
    ("/v1/embeddings", {"input": [_b64(_claiming(6000, 6000))] * 4, "modality": "image"}, None, 413, "in all"),
    ("/classify", {"image": _b64(_claiming(3000, 10)), "labels": ["a"]}, None, 400, "aspect ratio"),
    ("/v1/embeddings", None, b'{"input": "' + b"x" * (1 << 20) + b'"}', 413, "exceeds"),
])
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, path, body, raw, status, message):
    got, out = call(server, path, body, raw)
    assert got == status and message in out["error"]["message"], out
    assert call(server, "/health")[0] == 200


def _raw(server, request: bytes, chunks: list[bytes] = (), pause: float = 0.0) -> tuple[int, float]:
    """Send `request` (and `chunks`, `pause` s apart) on a raw socket; the status line's code and
    the seconds until it came."""
    import socket
    import time

    port = int(server["url"].rsplit(":", 1)[1])
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        for chunk in chunks:
            time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed: what the client is meant to see
                break
        status = sock.recv(64).split(b" ")[1]
        return int(status), time.perf_counter() - t0


def test_bodies_are_bounded_before_and_while_reading(server):
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, seconds = _raw(server, head + b'Content-Length: 10000000000\r\n\r\n{"input":')  # 10 GB announced
    assert status == 413 and seconds < 2
    status, seconds = _raw(server, head + b'Content-Length: 100\r\n\r\n{"input":')  # then silence
    assert status == 408 and seconds < 3
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KiB chunks without end: over 1 MiB is refused
    status, _ = _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 40)
    assert status == 413
    # 3 MiB sent whole before reading: refused at the limit, the rest discarded as it comes (kept
    # alive) or read and dropped (Connection: close); either way the client sees the 413, no reset
    for close in (b"", b"Connection: close\r\n"):
        status, _ = _raw(server, head + close + b"Content-Length: 3145728\r\n\r\n", [b" " * (1 << 20)] * 3)
        assert status == 413
    assert call(server, "/health")[0] == 200


def test_access_rules(server):
    req = urllib.request.Request(server["url"] + "/v1/embeddings", data=b'{"input": "x"}',
                                 headers={"Content-Type": "text/plain"})  # what a cross-site form can send
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 415
    port = int(server["url"].rsplit(":", 1)[1])
    status, _ = _raw(server, b"GET /thumbnail/0 HTTP/1.1\r\nHost: attacker.example:%d\r\n\r\n" % port)
    assert status == 421  # DNS rebinding: another name for this address is refused
    service = server["service"]
    limit, service.limits.max_inflight = service.limits.max_inflight, 0
    try:
        assert call(server, "/v1/embeddings", {"input": "x"})[0] == 503
    finally:
        service.limits.max_inflight = limit
    limit, service.limits.max_connections = service.limits.max_connections, 0
    try:  # a full server refuses work but still answers its monitor
        assert call(server, "/v1/embeddings", {"input": "x"})[0] == 503
        assert call(server, "/health")[0] == 200 and call(server, "/metrics")[0] == 200
    finally:
        service.limits.max_connections = limit
    service.access.api_key = "s3cret"
    try:
        assert call(server, "/v1/embeddings", {"input": "x"})[0] == 401
        req = urllib.request.Request(server["url"] + "/v1/embeddings", data=b'{"input": "x"}', headers={
            "Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        assert call(server, "/health")[0] == 200
    finally:
        service.access.api_key = None
    status, out = call(server, "/search", {"text": "a red square", "k": 2})
    assert status == 200 and all(set(r) <= {"index", "score", "id", "caption"} for r in out["results"])
    assert not any(r["id"].startswith("/") for r in out["results"])  # no path on the server's disk


def test_limits_are_positive():
    from clipper.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-texts must be positive, got 0"):
        Limits(max_texts=0)
    with pytest.raises(ConfigError, match="--read-timeout-s must be positive, got nan"):
        Limits(read_timeout_s=float("nan"))
    with pytest.raises(ConfigError, match="--max-buffered-bytes .* must be at least --max-body-bytes"):
        Limits(max_body_bytes=2 << 20, max_buffered_bytes=1 << 20)


class _Upload:
    """A request as `read_body` sees it: headers and a stream of `chunks`, then (if `stall`) silence."""

    def __init__(self, chunks: list[bytes], stall: bool = False):
        self.headers, self.chunks, self.stall = {}, chunks, stall

    async def stream(self):
        import asyncio

        for chunk in self.chunks:
            yield chunk
        if self.stall:
            await asyncio.sleep(3600)


def test_bodies_wait_for_the_buffer_budget():
    import asyncio

    from clipper.serve.body import BadRequest, BodyBudget, read_body

    async def run() -> None:
        budget = BodyBudget(Limits(max_body_bytes=100, max_buffered_bytes=100), free_bytes=10)
        holder = asyncio.ensure_future(read_body(_Upload([b"a" * 98], stall=True), 100, 5.0, budget))
        await asyncio.sleep(0.05)
        assert budget.held == 98
        # a body that does not fit waits; if its read timeout passes meanwhile: 503, nothing kept held
        with pytest.raises(BadRequest) as busy:
            await read_body(_Upload([b"b" * 30, b"b" * 20]), 100, 0.2, budget)
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
        assert budget.held == 98
        # one within the free bytes does not wait for anyone
        assert await read_body(_Upload([b"s" * 6, b"s" * 4]), 100, 0.2, budget) == b"s" * 10
        # one that waits while the holder goes reads on, whole
        waiter = asyncio.ensure_future(read_body(_Upload([b"c" * 30, b"c" * 20]), 100, 5.0, budget))
        await asyncio.sleep(0.05)
        assert not waiter.done() and budget.held == 128  # its first chunk arrived, and waits
        holder.cancel()
        assert await waiter == b"c" * 50 and budget.held == 0
        # a body that alone exceeds the budget is not kept waiting for itself
        small = BodyBudget(Limits(max_body_bytes=100, max_buffered_bytes=100), free_bytes=0)
        small.limits.max_buffered_bytes = 10
        assert await read_body(_Upload([b"d" * 40] * 2), 100, 1.0, small) == b"d" * 80 and small.held == 0
        # a stalled client alone gets 408, not 503
        with pytest.raises(BadRequest) as stalled:
            await read_body(_Upload([b"e"], stall=True), 100, 0.1, small)
        assert stalled.value.status == 408 and small.held == 0

    asyncio.run(run())


def test_a_cancelled_request_does_not_stop_its_batcher():
    import threading

    from clipper.serve.service import Batcher

    gate = threading.Event()
    batcher = Batcher(lambda items: (gate.wait(5), items)[1], max_batch=1)
    first = batcher.submit([1])  # taken by the worker, which waits at the gate
    second = batcher.submit([2])
    assert second.cancel()  # its client went away while it was queued
    gate.set()
    assert first.result(timeout=5) == [1]
    assert batcher.submit([3]).result(timeout=5) == [3]


def test_fifty_concurrent_requests_match_single_ones(server):
    texts = [f"a photo of thing number {i}" for i in range(50)]
    single = embed_texts(server["model"], texts)
    batches_before = server["service"].texts.batches
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda t: call(server, "/v1/embeddings", {"input": t}), texts))
    assert all(status == 200 for status, _ in results)
    got = np.array([out["data"][0]["embedding"] for _, out in results])
    assert np.allclose(got, single, atol=1e-5)
    assert server["service"].texts.batches - batches_before < 50  # requests were batched together


def test_demo_page_in_headless_chromium(server):
    image = server["tmp"] / "imgs" / "2.png"
    with demo_page(server["url"], "indexed") as page:
        # the label box holds the model's class names
        page.wait_for_function("document.getElementById('labels').value === 'red, blue, green'")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#top .bar", timeout=15000)
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=15000)
        page.wait_for_selector("#neighbours .hit img", timeout=15000)
        assert page.locator("#top .bar").count() == 3
        assert "2.png" in page.locator("#neighbours .hit").first.inner_text()
        page.fill("#query", "a red square")
        page.click("#search button[type=submit]")
        page.wait_for_selector("#results .hit img", timeout=15000)
        assert page.locator("#results .hit").count() == 6
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        if os.environ.get("CLIPPER_SCREENSHOT"):  # docs/demo.png is made this way
            page.screenshot(path=os.environ["CLIPPER_SCREENSHOT"], full_page=True)


def test_demo_page_shows_hostile_captions_and_labels_as_text(tmp_path):
    """Stored XSS: captions and file names of the indexed images, and labels, are shown as text."""
    payload = "<img src=x onerror=window.__pwned=1>"
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(i))
        (tmp_path / "imgs" / f"{i}.txt").write_text(payload)
    torch.manual_seed(0)
    model = clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).eval()
    embed_folder(model, "test", tmp_path / "imgs", tmp_path / "emb", dtype="float32", progress=False)
    Index.build(np.load(tmp_path / "emb" / "img_emb.npy")).save(tmp_path / "emb")
    url, stop = serve_in_thread(Service(model, "tiny", str(tmp_path / "emb")))
    try:
        with demo_page(url, "indexed") as page:
            page.fill("#labels", payload.replace(",", " "))
            page.set_input_files("#file", str(tmp_path / "imgs" / "1.png"))
            page.wait_for_selector("#top .bar", timeout=15000)
            page.fill("#query", "a picture")
            page.click("#search button[type=submit]")
            page.wait_for_selector("#results .hit", timeout=15000)
            page.wait_for_timeout(300)  # an injected <img> would have fired its onerror by now
            assert page.evaluate("window.__pwned") is None
            assert payload in page.locator("#results .hit").first.inner_text()
            assert payload in page.locator("#top .bar").first.inner_text()
    finally:
        stop()
