"""The embedding verbs: Python API, `clipper embed / classify / index / search / eval`, int8."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipper
from clipper import embed_dir as embed_mod
from clipper.cli import main
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.embed import classify, embed_images, embed_texts
from clipper.embed_dir import embed_folder
from clipper.errors import ConfigError
from clipper.evaluate import evaluate_task
from clipper.index import Index
from clipper.quantize import quantize_int8
from conftest import rgb_tiny, two_class_images



def _random_image(rng, size=(24, 20)):
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def messy_images(tmp_path):
    """Good JPEGs and PNGs (one nested, with a caption), and the usual rubbish."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i in range(4):
        _random_image(rng).save(root / f"{i}.jpg", quality=90)
    _random_image(rng, (40, 30)).save(root / "nested" / "deeper" / "n.png")
    (root / "nested" / "deeper" / "n.txt").write_text("a nested picture")
    jpeg = (root / "0.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "text.jpg").write_text("just text")
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.pdf").write_text("%PDF")
    return root


def test_api_shapes_norms_and_inputs_agree(messy_images):
    model = rgb_tiny()
    paths = [messy_images / f"{i}.jpg" for i in range(4)]
    by_path = model.embed_images(paths, batch_size=3)
    by_pil = model.embed_images([Image.open(p) for p in paths], batch_size=1)
    assert by_path.shape == (4, 32) and by_path.dtype == np.float32
    assert np.allclose(np.linalg.norm(by_path, axis=1), 1, atol=1e-5)
    assert np.abs(by_path - by_pil).max() <= 1e-6
    texts = model.embed_texts(["a dog", "a much longer caption of a dog on a red sofa"])
    assert texts.shape == (2, 32) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    as_torch = model.embed_texts("a dog", to_numpy=False)
    assert isinstance(as_torch, torch.Tensor) and torch.allclose(as_torch[0], torch.from_numpy(texts[0]), atol=1e-6)
    with pytest.raises(clipper.images.ImageError, match="text.jpg: not an image"):
        model.embed_images([paths[0], messy_images / "text.jpg"])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        model.embed_texts(["ok", 3])


def test_texts_computed_to_the_longest_caption_equal_full_context():
    model = rgb_tiny()
    texts = ["a", "a photo of a cat.", "x y z"]
    tokens = clipper.Tokenizer(12)(texts)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(model.text(tokens), dim=-1)  # every row at full context
    assert torch.allclose(embed_texts(model, texts, to_numpy=False), full, atol=1e-6)


def test_embed_verb_on_a_messy_folder(messy_images, tmp_path, capsys):
    model = rgb_tiny()
    model.save(tmp_path / "m")
    out = tmp_path / "emb"
    assert main(["embed", str(messy_images), "--model", str(tmp_path / "m"), "--out", str(out),
                 "--dtype", "float32", "--workers", "2", "--batch-size", "2"]) == 0
    ids = [json.loads(line) for line in (out / "ids.jsonl").read_text().splitlines()]
    assert [r["id"].split("imgs/")[1] for r in ids] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "nested/deeper/n.png"]
    assert ids[-1]["caption"] == "a nested picture"
    skipped = {json.loads(line)["id"].split("imgs/")[1]: json.loads(line)["reason"]
               for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {"corrupt.jpg", "text.jpg", "zero.jpg", "notes.pdf"}
    assert "truncated" in skipped["corrupt.jpg"].lower() and "0 bytes" in skipped["zero.jpg"]
    emb = np.load(out / "img_emb.npy")
    direct = embed_images(model, [r["id"] for r in ids])
    assert emb.dtype == np.float32 and np.abs(emb - direct).max() <= 1e-6
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["images"] == 5 and manifest["skipped"] == 4 and not (out / "parts").exists()


def test_embed_1000_files_equals_the_api_batch_by_batch(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(1000):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
    model = rgb_tiny()
    manifest = embed_folder(model, "test", root, tmp_path / "out", dtype="float32", batch_size=64, workers=2,
                            part_size=256, progress=False)
    emb = np.load(tmp_path / "out" / "img_emb.npy")
    paths = sorted(root.iterdir())
    direct = np.concatenate([embed_images(model, paths[i:i + 50]) for i in range(0, 1000, 50)])
    assert manifest["images"] == 1000 and emb.shape == (1000, 32)
    assert np.abs(emb - direct).max() <= 1e-6


def test_processes_sharing_a_run_give_the_straight_runs_folder(messy_images, tmp_path, capsys):
    """--part i/N (SLURM arrays, torchrun ranks): each process embeds every N-th part, the last to
    finish joins; rerunning a finished share redoes nothing."""
    model = rgb_tiny()
    embed_folder(model, "m", messy_images, tmp_path / "straight", part_size=2, progress=False)
    first = embed_folder(model, "m", messy_images, tmp_path / "shared", part_size=2, progress=False, share=(1, 3))
    assert first == {"joined": False, "parts_done": 1, "parts": 4}  # parts 1 of 0..3
    assert embed_folder(model, "m", messy_images, tmp_path / "shared", part_size=2, progress=False,
                        share=(1, 3)) == first
    assert embed_folder(model, "m", messy_images, tmp_path / "shared", part_size=2, progress=False,
                        share=(0, 3))["parts_done"] == 3  # parts 0 and 3
    with pytest.raises(ValueError, match="unfinished embedding of other inputs or settings"):
        embed_folder(model, "m", messy_images, tmp_path / "shared", part_size=3, progress=False, share=(2, 3))
    last = embed_folder(model, "m", messy_images, tmp_path / "shared", part_size=2, progress=False, share=(2, 3))
    assert last["images"] == 5
    for name in ("img_emb.npy", "ids.jsonl", "skipped.jsonl"):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    capsys.readouterr()
    assert main(["embed", str(messy_images), "--model", "x", "--out", str(tmp_path / "o"), "--part", "3/3"]) == 2
    assert "0 <= i < N" in capsys.readouterr().err


def test_interrupted_embed_resumes_without_redoing_parts(messy_images, tmp_path, monkeypatch):
    model = rgb_tiny()
    calls = []
    real = embed_mod.embed_items

    def counting(model, items, *args, **kw):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while embedding the third part
        return real(model, items, *args, **kw)

    monkeypatch.setattr(embed_mod, "embed_items", counting)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(model, "m", messy_images, tmp_path / "out", part_size=2, progress=False)
    assert not (tmp_path / "out" / "img_emb.npy").exists()
    with pytest.raises(ValueError, match="unfinished embedding of other inputs or settings"):
        embed_folder(model, "m", messy_images, tmp_path / "out", part_size=3, progress=False)  # rows would repeat
    calls.clear()
    embed_folder(model, "m", messy_images, tmp_path / "out", part_size=2, progress=False)
    assert len(calls) == 2  # 8 candidate images in parts of 2: two were done before the kill
    monkeypatch.setattr(embed_mod, "embed_items", real)
    embed_folder(model, "m", messy_images, tmp_path / "straight", part_size=2, progress=False)
    assert np.array_equal(np.load(tmp_path / "out" / "img_emb.npy"), np.load(tmp_path / "straight" / "img_emb.npy"))
    assert (tmp_path / "out" / "ids.jsonl").read_text() == (tmp_path / "straight" / "ids.jsonl").read_text()
    with pytest.raises(ValueError, match="other inputs or settings"):
        embed_folder(model, "m", messy_images, tmp_path / "out", dtype="float32", progress=False)


def test_embed_shards_and_list_files(tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(5)]
    write_shards([Sample(key=f"k{i}", image=im, text=f"caption {i}") for i, im in enumerate(images)],
                 tmp_path / "shards", samples_per_shard=2)
    model = rgb_tiny()
    embed_folder(model, "m", tmp_path / "shards", tmp_path / "a", dtype="float32", progress=False)
    ids = [json.loads(line) for line in (tmp_path / "a" / "ids.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in ids] == [f"caption {i}" for i in range(5)]
    direct = embed_images(model, [Image.fromarray(im) for im in images])
    assert np.abs(np.load(tmp_path / "a" / "img_emb.npy") - direct).max() <= 1e-6
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("# five images\n" + "".join(f"{i}.png\tpicture {i}\n" for i in range(5)))
    embed_folder(model, "m", tmp_path / "list.txt", tmp_path / "b", dtype="float32", progress=False)
    assert np.abs(np.load(tmp_path / "b" / "img_emb.npy") - direct).max() <= 1e-6


def test_classify_a_model_trained_on_two_classes(tmp_path, capsys):
    from clipper.data.transforms import Preprocess
    from clipper.losses import infonce_loss

    rng = np.random.default_rng(3)
    model = rgb_tiny().train()
    tokenizer, transform = clipper.Tokenizer(12), Preprocess(model.config.vision)
    captions = ["a photo of a red square.", "a photo of a blue square."]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        images, labels = two_class_images(rng, 16)
        tokens = tokenizer([captions[i] for i in labels])
        out = model(torch.stack([transform(im) for im in images]), tokens)
        loss = infonce_loss(out["image_features"], out["text_features"], out["logit_scale"], tokens=tokens)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    images, labels = two_class_images(rng, 20)
    result = classify(model, images, ["red", "blue"], templates=["a photo of a {} square."], k=2)
    assert result.probs.shape == (20, 2) and np.allclose(result.probs.sum(1), 1, atol=1e-5)
    assert [top[0][0] for top in result.top] == [["red", "blue"][i] for i in labels]
    # The CLI on files gives the same answer
    model.save(tmp_path / "m")
    for i, im in enumerate(images[:4]):
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "t.txt").write_text("a photo of a {} square.\n")
    assert main(["classify", *[str(tmp_path / f"{i}.png") for i in range(4)], "--model", str(tmp_path / "m"),
                 "--labels", "red,blue", "--templates", str(tmp_path / "t.txt"), "--json", "-k", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["top"][0]["label"] for r in rows] == [["red", "blue"][i] for i in labels[:4]]


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_search_is_brute_force_and_faiss_agrees(tmp_path, monkeypatch):
    import clipper.index as index_mod

    rng = np.random.default_rng(4)
    vectors, queries = _unit(rng, 3000, 48), _unit(rng, 9, 48)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    monkeypatch.setattr(index_mod, "SCORES_PER_BLOCK", 9 * 700)  # several blocks, merged
    exact = Index.build(vectors).search(queries, 10)
    assert np.array_equal(exact.indices, brute)
    assert np.allclose(exact.scores, np.take_along_axis(queries @ vectors.T, brute, 1), atol=1e-5)
    pytest.importorskip("faiss")
    flat = Index.build(vectors, "faiss-flat").search(queries, 10)
    assert np.array_equal(flat.indices, brute)
    np.save(tmp_path / "img_emb.npy", vectors)
    Index.build(vectors, "faiss-hnsw", ef_search=256).save(tmp_path)
    hnsw = Index.load(tmp_path).search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.indices, brute)]) >= 0.9


def test_index_and_search_verbs(messy_images, tmp_path, capsys):
    model = rgb_tiny()
    model.save(tmp_path / "m")
    out = tmp_path / "emb"
    assert main(["embed", str(messy_images), "--model", str(tmp_path / "m"), "--out", str(out), "--workers", "0"]) == 0
    assert main(["index", str(out)]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "--image", str(messy_images / "2.jpg"), "-k", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and rows[0]["id"].endswith("imgs/2.jpg") and rows[0]["score"] > 0.99
    assert main(["search", str(out), "a nested picture", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # one clear line on bad input
    for argv, message in [
        (["search", str(out)], "text QUERY or --image"),
        (["search", str(tmp_path), "x"], "no index.json"),
        (["classify", str(messy_images / "0.jpg"), "--model", str(tmp_path / "m")], "--labels"),
        (["embed", str(tmp_path / "nowhere"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], "no such"),
        (["embed", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], "INPUT"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def test_search_and_serve_refuse_an_index_of_another_model(tmp_path, capsys):
    """Same architecture and dimension, other weights: the fingerprint in embed.json tells them apart."""
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rgb_tiny(seed=0).save(tmp_path / "m0")
    rgb_tiny(seed=1).save(tmp_path / "m1")
    assert main(["embed", str(tmp_path / "a.png"), "--model", str(tmp_path / "m0"), "--out", str(tmp_path / "e")]) == 0
    assert main(["index", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "e"), "a bag", "--model", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "embedded by another model" in err and len(err.splitlines()) == 1
    assert main(["search", str(tmp_path / "e"), "a bag", "--model", str(tmp_path / "m0")]) == 0
    pytest.importorskip("fastapi")
    from clipper.errors import DataError
    from clipper.serve.config import Limits
    from clipper.serve.service import Service

    with pytest.raises(DataError, match="another model"):
        Service(clipper.load(tmp_path / "m1"), "m1", str(tmp_path / "e"), Limits())


def test_search_refuses_a_random_init_preset_without_model(tmp_path, capsys):
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["embed", str(tmp_path / "a.png"), "--model", "fmnist-tiny", "--out", str(tmp_path / "e")]) == 0
    assert main(["index", str(tmp_path / "e")]) == 0
    assert main(["search", str(tmp_path / "e"), "a bag"]) == 2
    assert "randomly initialised" in capsys.readouterr().err


def test_eval_zeroshot_and_retrieval_match_a_direct_computation(tmp_path, capsys):
    rng = np.random.default_rng(6)
    names = ["red", "green", "blue"]
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    write_shards([Sample(key=f"k{i}", image=im, text=f"picture number {i}", meta={"class": names[i % 3]})
                  for i, im in enumerate(images)], tmp_path / "test", samples_per_shard=5)
    model = rgb_tiny()
    model.save(tmp_path / "m")
    (tmp_path / "labels.txt").write_text("\n".join(names))
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "zeroshot", "--data", str(tmp_path / "test"),
                 "--labels-file", str(tmp_path / "labels.txt")]) == 0
    got = json.loads(capsys.readouterr().out)
    img = embed_images(model, [Image.fromarray(im) for im in images])
    cls = embed_texts(model, [f"a photo of a {n}." for n in names])
    pred = (img @ cls.T).argmax(1)
    assert got["top1"] == pytest.approx(100 * np.mean(pred == np.arange(12) % 3), abs=1e-4) and got["n"] == 12
    retrieval = evaluate_task(model, "retrieval", str(tmp_path / "test"), batch_size=5)
    sim = embed_texts(model, [f"picture number {i}" for i in range(12)]) @ img.T
    t2i = np.mean([(sim[i] > sim[i, i]).sum() == 0 for i in range(12)])
    assert retrieval["t2i_R@1"] == pytest.approx(100 * t2i, abs=1e-4)


def test_int8_is_close_to_fp32():
    model = rgb_tiny()
    quantized = quantize_int8(model)
    rng = np.random.default_rng(7)
    images = [_random_image(rng, (16, 16)) for _ in range(8)]
    a, b = embed_images(model, images), embed_images(quantized, images)
    assert (a * b).sum(1).min() >= 0.99
    texts = ["a photo of a dog.", "red", "a small bag on a table"]
    assert (embed_texts(model, texts) * embed_texts(quantized, texts)).sum(1).min() >= 0.99
    assert isinstance(model.visual.transformer.blocks[0].mlp.fc, torch.nn.Linear)  # the original is untouched


def test_faiss_padding_is_never_a_hit():
    """An IVF search that visits one small cell finds fewer than k: faiss pads with -1, which must not
    read as the last vector."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    vectors = _unit(rng, 400, 16)
    result = Index.build(vectors, "faiss-ivf", ivf_lists=10, nprobe=1).search(vectors[:4], 100)
    assert (result.indices == -1).any()  # padding there is
    for row in range(4):
        hits = result.hits(row)
        assert hits and all(0 <= i < 400 for _, i in hits) and hits[0][1] == row


def test_compressed_index_reranks_exactly_from_the_memory_map(tmp_path):
    """faiss-ivfpq keeps 4-byte codes of 32-d vectors and re-scores its candidates from the vectors
    file: its scores are exact dot products, its recall near exact search's, and it saves and loads."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    vectors = _unit(rng, 10000, 32)
    np.save(tmp_path / "img_emb.npy", vectors.astype(np.float16))
    stored = np.load(tmp_path / "img_emb.npy", mmap_mode="r")
    queries = _unit(rng, 20, 32) * 0.3 + stored[:20].astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    Index.build(stored, "faiss-ivfpq", ivf_lists=10, nprobe=10, pq_bytes=4, rerank=16).save(tmp_path)
    index = Index.load(tmp_path)
    assert index.faiss_index.code_size == 4 and index.params["rerank"] == 16
    truth = Index.build(stored).search(queries, 10)

    def recall(result):
        return np.mean([len(set(g) & set(t)) / 10 for g, t in zip(result.indices, truth.indices)])

    got = index.search(queries, 10)
    codes_only = Index.build(stored, "faiss-ivfpq", ivf_lists=10, nprobe=10, pq_bytes=4, rerank=1).search(queries, 10)
    # random vectors are PQ's hard case: re-ranking is what finds their neighbours
    assert recall(got) >= 0.8 and recall(got) > recall(codes_only) + 0.3
    assert (got.indices[:, 0] == np.arange(20)).all()
    exact = np.einsum("qd,qkd->qk", queries, stored[got.indices].astype(np.float32))
    assert np.allclose(got.scores, exact, atol=1e-5)
    with pytest.raises(ConfigError, match="must divide"):
        Index.build(stored, "faiss-ivfpq", pq_bytes=7)
    with pytest.raises(ConfigError, match="at least 9984 vectors"):
        Index.build(stored[:9000], "faiss-ivfpq")
