"""Shards named by URL (issue #19): `pipe:` commands and http(s) read like the local files they
copy, for embedding and training alike; a failing, oversized or silent source is a named skip."""

import functools
import http.server
import threading

import numpy as np
import pytest

from clipper.data import remote
from clipper.data.inputs import list_images
from clipper.data.reader import Skip, list_shards, read_tar, shard_sizes
from clipper.data.samples import Sample
from clipper.data.shards import write_shards


@pytest.fixture()
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPPER_SHARD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    write_shards([Sample(key=f"k{i}", image=rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), text=f"caption {i}")
                  for i in range(5)], tmp_path / "shards", samples_per_shard=2)
    return tmp_path / "shards"


def _same_items(a, b):
    assert [i.id for i in a] == [i.id for i in b] and [i.caption for i in a] == [i.caption for i in b]
    assert [i.read() for i in a] == [i.read() for i in b]


def test_pipe_shards_read_like_local_ones(shards):
    url = f"pipe:cat {shards}/{{00000..00002}}.tar"
    assert list_shards(url) == [f"pipe:cat {shards}/0000{i}.tar" for i in range(3)]
    local, _ = list_images(shards)
    piped, skipped = list_images(url)
    assert not skipped
    _same_items(piped, local)
    assert piped[0].record()["path"].startswith("pipe:cat ")  # where the bytes are, as given
    for shard in list_shards(url):  # the training reader
        assert list(read_tar(shard)) == [{**s, "__url__": shard} for s in read_tar(shard.removeprefix("pipe:cat "))]
    assert shard_sizes(list_shards(url)) == [2, 2, 1]
    assert len(list((shards.parent / "cache").iterdir())) == 3  # fetched once each, no temporary left


def test_http_shards(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        _same_items(list_images(f"{base}/{{00000..00002}}.tar")[0], list_images(shards)[0])
        items, skipped = list_images(f"{base}/00009.tar")
        assert not items and "could not fetch" in skipped[0].reason and "404" in skipped[0].reason
    finally:
        server.shutdown()


def test_failing_oversized_and_silent_sources_are_named_skips(shards, monkeypatch):
    items, skipped = list_images(f"pipe:cat {shards}/00000.tar && false")
    assert not items and "exited with status 1" in skipped[0].reason
    assert isinstance(list(read_tar("pipe:exit 3"))[-1], Skip)
    monkeypatch.setattr(remote, "MAX_SHARD_BYTES", 1000)
    assert "larger than 1000 bytes" in list_images(f"pipe:cat {shards}/00001.tar")[1][0].reason
    monkeypatch.setattr(remote, "FETCH_TIMEOUT_S", 0.5)
    assert "no output within" in list_images("pipe:sleep 30")[1][0].reason
    assert not list((shards.parent / "cache").iterdir())  # nothing half-fetched kept
