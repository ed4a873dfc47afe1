"""The multipart/form-data parser of `clipper serve` (issue #37): the parts a real client sends, the
RFC corners it takes, and a fuzz of 10,000 mutated bodies, each parsed in < 100 ms and < 50 MB to
its parts or a FormError."""

import base64
import random
import time
import tracemalloc

import pytest

from clipper.serve.multipart import FormError, parse_form

CT = "multipart/form-data; boundary=B"


def _body(*parts: tuple[bytes, bytes], preamble: bytes = b"") -> bytes:
    return preamble + b"".join(b"--B\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts) + b"--B--\r\n"


def test_the_parts_a_client_sends():
    requests = pytest.importorskip("requests")
    png = bytes(range(256)) * 40 + b"\r\n--B" + b"\r\n--"  # binary, with almost-delimiters in it
    prepared = requests.Request("POST", "http://x/", files=[("image", ("a.png", png, "image/png")),
                                                            ("image", ("b.png", b"", "image/png"))],
                                data={"labels": "red, blue", "k": "2"}).prepare()
    parts = parse_form(prepared.body, prepared.headers["Content-Type"], 10)
    assert [(p.name, p.data, p.is_file) for p in parts] == [
        ("labels", b"red, blue", False), ("k", b"2", False), ("image", png, True), ("image", b"", True)]


def test_rfc_corners():
    parts = parse_form(_body((b'Content-Disposition: form-data; name="a\\"b"; filename*=utf-8\'\'%C3%A9.png', b"x"),
                             (b"Content-Disposition: form-data; name*=utf-8''caf%C3%A9", b"y"),
                             (b'content-disposition:  FORM-DATA ;\r\n name=z\r\nContent-Transfer-Encoding: base64',
                              base64.encodebytes(b"hello")),
                             (b'Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: quoted-printable',
                              b"a=3Db"), preamble=b"ignored preamble\r\n"), CT, 10)
    assert [(p.name, p.data, p.is_file) for p in parts] == [
        ('a"b', b"x", True), ("caf\u00e9", b"y", False), ("z", b"hello", False), ("q", b"a=b", False)]
    assert parse_form(b"--B  \r\n" + b'Content-Disposition: form-data; name="t"\r\n\r\nv\r\n--B--', CT, 1)[0].data == b"v"


@pytest.mark.parametrize("body,content_type,message", [
    (_body((b'Content-Disposition: form-data; name="a"', b"x")), "multipart/form-data", "boundary"),
    (_body((b'Content-Disposition: form-data; name="a"', b"x")), "text/plain; boundary=B", "multipart/form-data"),
    (_body((b'Content-Disposition: form-data; name="a"', b"x")), CT + "".join(f"; x{i}=1" for i in range(20)),
     "more than 16 parameters"),
    (_body((b'Content-Disposition: form-data; name="a"; name="b"', b"x")), CT, "given twice"),
    (_body((b'Content-Disposition: form-data; filename="a"', b"x")), CT, "without a name"),
    (_body((b'Content-Disposition: attachment; name="a"', b"x")), CT, "expected form-data"),
    (_body((b'Content-Disposition: form-data; name="a', b"x")), CT, "unterminated"),
    (_body((b'Content-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: x-uuencode', b"x")), CT,
     "not supported"),
    (_body((b'Content-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: base64', b"!!")), CT,
     "not valid base64"),
    (_body((b'Content-Disposition: form-data; name="a"\r\nContent-Type: multipart/mixed; boundary=C', b"x")), CT,
     "nested"),
    (_body((b'Content-Disposition: form-data; name="a"\r\n' + b"X: y\r\n" * 20, b"x")), CT, "header lines"),
    (b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx', CT, "no closing boundary"),
    (b"no delimiter at all", CT, "no boundary"),
    (b"--B--\r\n", CT, "1 to 4 parts"),
    (_body(*[(b'Content-Disposition: form-data; name="a"', b"x")] * 5), CT, "1 to 4 parts"),
])
def test_malformed_bodies_are_named(body, content_type, message):
    with pytest.raises(FormError, match=message):
        parse_form(body, content_type, 4)


TOKENS = [b"--B", b"--B--", b"\r\n", b"\r\n\r\n", b'"', b";", b"=", b"(" * 50, b"\\", b"name*0=", b"name=",
          b"filename*=utf-8''%FF%FE", b"Content-Transfer-Encoding: base64\r\n",
          b"Content-Type: multipart/mixed; boundary=B\r\n", b"=?utf-8?q?a?= " * 20, b"\x00", b"\xff\xfe",
          b"Content-Disposition: form-data; name=x\r\n"]


def _mutated(rng: random.Random, seeds: list[bytes]) -> bytes:
    body = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 6)):
        op, at = rng.randrange(5), rng.randrange(len(body) + 1)
        if op == 0 and body:  # flip a byte
            body[min(at, len(body) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a token
            body[at:at] = rng.choice(TOKENS)
        elif op == 2:  # delete a range
            del body[at:at + rng.randint(1, 64)]
        elif op == 3:  # repeat a slice many times (a bomb)
            piece = bytes(body[at:at + rng.randint(1, 40)]) or b"--B\r\n\r\n\r\n"
            body[at:at] = piece * rng.randint(1, min(20_000, (1 << 20) // len(piece)))
        else:  # cut the end
            del body[at:]
    return bytes(body)


def test_fuzz_10000_mutated_bodies():
    rng = random.Random(0)
    png = bytes(rng.randrange(256) for _ in range(3000))
    seeds = [_body((b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png', png),
                   (b'Content-Disposition: form-data; name="labels"', b"red, blue")),
             _body((b'Content-Disposition: form-data; name="options"', b'{"num_beams": 2}'),
                   (b'Content-Disposition: form-data; name="k"', b"3"),
                   (b'Content-Disposition: form-data; name="input"; filename="b.png"', png[:100]))]
    assert [p.name for p in parse_form(seeds[0], CT, 8)] == ["image", "labels"]
    outcomes = {"parts": 0, "refused": 0}
    slowest = peak = 0.0
    for i in range(10_000):
        body = _mutated(rng, seeds)
        measure_memory = i % 20 == 0  # tracemalloc slows the parse: a sample of the bodies
        if measure_memory:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            parts = parse_form(body, CT, 64)
            assert 1 <= len(parts) <= 64 and all(p.name and isinstance(p.data, bytes) for p in parts)
            assert sum(len(p.data) for p in parts) <= len(body)
            outcomes["parts"] += 1
        except FormError as e:
            assert e.status in (400, 413) and "\n" not in str(e)
            outcomes["refused"] += 1
        elapsed = time.perf_counter() - t0
        if measure_memory:
            peak = max(peak, tracemalloc.get_traced_memory()[1] / 2 ** 20)
            tracemalloc.stop()
        else:
            slowest = max(slowest, elapsed)
    assert slowest < 0.1 and peak < 50, (slowest, peak)
    assert min(outcomes.values()) > 500  # both kinds of outcome were exercised
