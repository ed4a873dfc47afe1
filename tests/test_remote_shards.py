"""Shards named by URL (issue #19): `pipe:` commands and http(s) read like the local files they
copy, for embedding and training alike; a failing, oversized or silent source is a named skip.
Only what the user typed is a URL, and `pipe:` needs an opt-in (issue #37): names found in
folders, globs and list files are files, and never run or fetch anything."""

import functools
import http.server
import shutil
import threading
import time

import numpy as np
import pytest

from clipper.data import remote
from clipper.errors import ConfigError
from clipper.data.inputs import list_images
from clipper.data.reader import Skip, list_shards, read_tar, shard_sizes
from clipper.data.samples import Sample
from clipper.data.shards import write_shards


@pytest.fixture()
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPPER_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(remote.PIPE_ENV, "1")  # as `clipper --allow-pipe` does
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
    assert isinstance(list(read_tar(list_shards("pipe:exit 3")[0]))[-1], Skip)
    monkeypatch.setattr(remote, "MAX_SHARD_BYTES", 1000)
    assert "larger than 1000 bytes" in list_images(f"pipe:cat {shards}/00001.tar")[1][0].reason
    monkeypatch.setattr(remote, "FETCH_TIMEOUT_S", 0.5)
    assert "`sleep 30` did not finish within 0.5 s" in list_images("pipe:sleep 30")[1][0].reason
    assert not list((shards.parent / "cache").iterdir())  # nothing half-fetched kept


def test_a_command_that_writes_to_stderr_does_not_hang(shards):
    t0 = time.monotonic()
    piped, skipped = list_images(f"pipe:head -c 200000 /dev/zero >&2; cat {shards}/00000.tar")
    assert not skipped and len(piped) == 2 and time.monotonic() - t0 < 10
    items, skipped = list_images("pipe:echo the reason >&2; head -c 300000 /dev/zero >&2; exit 4")
    assert not items and "status 4 (the reason)" in skipped[0].reason


def test_pipe_needs_the_opt_in(shards, monkeypatch):
    monkeypatch.delenv(remote.PIPE_ENV)
    for spec in (f"pipe:cat {shards}/00000.tar", [f"pipe:cat {shards}/00000.tar"]):
        with pytest.raises(ConfigError, match="--allow-pipe"):
            list_shards(spec)
    with pytest.raises(ConfigError, match="--allow-pipe"):
        list_images(f"pipe:cat {shards}/00000.tar")
    assert len(list_images(f"pipe:cat {shards}/00000.tar", allow_pipe=True)[0]) == 2


def test_names_found_in_data_never_run_or_fetch(shards, tmp_path, monkeypatch):
    """Files named like commands and URLs, in a folder, a glob and a list file, with pipe: allowed
    for what is typed: each is read as the file it is, and nothing runs."""
    import clipper
    from clipper.embed_dir import embed_folder
    from conftest import RGB_TINY

    folder = tmp_path / "d"
    folder.mkdir()
    png = (shards.parent / "a.png")
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    hostile = ["pipe:touch PWNED;cat a.png;#.png", "https:__evil.example_x.png"]
    for name in hostile:
        shutil.copy(png, folder / name)
    (folder / "list.txt").write_text("pipe:touch PWNED;cat a.png;#.png\n")
    (tmp_path / "s").mkdir()
    shutil.copy(shards / "00000.tar", tmp_path / "s" / "pipe:touch PWNED2;cat x;#.tar")
    model = clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).eval()
    monkeypatch.chdir(folder)
    items, _ = list_images(".")
    assert sorted(i.path for i in items) == sorted(hostile) and all(i.read() == png.read_bytes() for i in items)
    assert [i.read() for i in list_images("list.txt")[0]] == [png.read_bytes()]
    embed_folder(model, "test", ".", tmp_path / "e", progress=False)
    monkeypatch.chdir(tmp_path / "s")
    assert list_shards("*.tar") == ["pipe:touch PWNED2;cat x;#.tar"]  # a glob's names are files
    assert [s["__key__"] for s in read_tar(list_shards("*.tar")[0])] == ["k0", "k1"]
    embed_folder(model, "test", "*.tar", tmp_path / "e2", progress=False)
    embed_folder(model, "test", ".", tmp_path / "e3", progress=False)
    # the commands of issue #37, through the CLI, with --allow-pipe given (it must not matter here)
    from clipper.cli import main

    model.save(tmp_path / "m")
    assert main(["--allow-pipe", "eval", "--task", "retrieval", "--data", "*.tar", "--model", str(tmp_path / "m")]) == 0
    monkeypatch.chdir(folder)
    assert main(["--allow-pipe", "embed", ".", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e4"),
                 "--workers", "0"]) == 0
    assert not any(tmp_path.rglob("PWNED*")) and not any(shards.parent.rglob("PWNED*"))
    assert not (shards.parent / "cache").exists() or not any((shards.parent / "cache").iterdir())  # nothing fetched


def test_the_cli_runs_pipe_shards_only_with_allow_pipe(shards, tmp_path, monkeypatch, capsys):
    import clipper
    from clipper.cli import main
    from conftest import RGB_TINY

    monkeypatch.delenv(remote.PIPE_ENV)
    clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).save(tmp_path / "m")
    spec = f"pipe:cat {shards}/00000.tar"
    assert main(["embed", spec, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"), "--workers", "0"]) == 2
    assert "--allow-pipe" in capsys.readouterr().err
    assert main(["--allow-pipe", "embed", spec, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"),
                 "--workers", "0"]) == 0
    assert len((tmp_path / "e" / "ids.jsonl").read_text().splitlines()) == 2
