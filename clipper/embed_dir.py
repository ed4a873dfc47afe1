"""The output folders of `clipper embed`: `embed_folder` writes one that survives interruption
(parts of `part_size` items written atomically as they complete, a rerun skips the finished ones,
the last step joins them into `img_emb.npy` + `ids.jsonl` (+ `skipped.jsonl`)), `embed_text_file`
its texts' twin; their manifests, and the index built over them, read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data.inputs import list_images
from .data.items import ImageItem, InputSkip
from .embed import embed_items, embed_texts
from .errors import ConfigError, DataError
from .index import Index
from .io import atomic_path, read_json_object, read_jsonl, read_lines, write_json, write_jsonl
from .model import CLIP
from .progress import Progress, track

EMBED_MANIFEST = "embed.json"
JOIN_LOCK = "join.lock"  # in parts/: which process of a shared run joins the parts
TEXT_MANIFEST = "text_embed.json"


def _fingerprint(model: list, items: list[ImageItem], dtype: str, exact_decode: bool, part_size: int) -> str:
    h = hashlib.sha1(json.dumps([model, dtype, exact_decode, part_size]).encode())
    for item in items:
        h.update(f"{item.id}\0{item.offset}\0{item.size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def read_manifest(folder: str | os.PathLike) -> dict:
    """embed.json of a `clipper embed` output folder: counts, dimension, and how to load the model."""
    return read_json_object(Path(folder) / EMBED_MANIFEST, "embedding manifest",
                            {"model": (dict, str), "dim": int, "images": int})


def read_ids(folder: str | os.PathLike, count: int) -> list[dict]:
    """ids.jsonl of an embedding folder: one row with a string "id" for each of `count` vectors."""
    path = Path(folder) / "ids.jsonl"
    ids = read_jsonl(path, "ids file")
    if len(ids) != count:
        raise DataError(f"{path}: {len(ids)} rows for {count} vectors; embed the folder again")
    bad = next((n for n, row in enumerate(ids, 1) if not isinstance(row.get("id"), str)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad} has no string 'id'")
    return ids


def open_index(folder: str | os.PathLike, model: CLIP | None = None) -> tuple[Index, list[dict], dict]:
    """The search index of a `clipper embed` + `clipper index` folder, its ids.jsonl rows (one per
    vector, each with an "id") and its manifest; with `model`, it must be the model that embedded them."""
    folder = Path(folder)
    index, manifest = Index.load(folder), read_manifest(folder)
    ids = read_ids(folder, len(index))
    if model is not None:
        check_same_model(folder, manifest, index.dim, model)
    return index, ids, manifest


def check_same_model(folder: Path, manifest: dict, dim: int, model: CLIP) -> None:
    """Queries must come from the model that embedded the folder: same dimension, and (for folders
    that record it) the same `CLIP.fingerprint`."""
    if dim != model.config.embed_dim:
        raise DataError(f"{folder}: holds {dim}-d vectors, the model embeds in {model.config.embed_dim} dimensions")
    recorded = manifest.get("model_fingerprint")
    if recorded is not None and recorded != model.fingerprint():
        raise DataError(f"{folder}: embedded by another model (fingerprint {recorded}, this one "
                        f"{model.fingerprint()}); query it with the model its embed.json names")


def _parts(out: Path, n_items: int, part_size: int) -> Iterator[tuple[int, range, Path]]:
    for p, start in enumerate(range(0, n_items, part_size)):
        yield p, range(start, min(start + part_size, n_items)), out / "parts" / f"{p:06d}"


def embed_folder(model: CLIP, model_spec: dict | str, source: str | os.PathLike, out: str | os.PathLike,
                 dtype: str = "float16", batch_size: int = 64, workers: int = 0, part_size: int = 1024,
                 exact_decode: bool = False, progress: bool = True, share: tuple[int, int] = (0, 1)) -> dict:
    """Embed every image of `source` (see `list_images`) into `out`; resumes an interrupted run.

    Writes img_emb.npy [N, D] (`dtype`), ids.jsonl (row-aligned: id, caption if any),
    skipped.jsonl (id, reason) and embed.json (counts, and `model_spec`: how to load the model
    again, for searching); returns the manifest.

    `share` (i, n): this process embeds parts i, i + n, i + 2n, ... of the same plan (ranks of a
    torchrun job, tasks of a SLURM array; `out` on a shared filesystem). The process that finds
    every part done joins them; the others return {"joined": False, ...} with the count.
    """
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype: float16 or float32, got {dtype!r}")
    if part_size < 1:
        raise ConfigError(f"part_size: must be >= 1, got {part_size}")
    index, shares = share
    if not 0 <= index < shares:
        raise ConfigError(f"part: {index}/{shares} is not one of 0/{shares} .. {shares - 1}/{shares}")
    items, passed_over = list_images(source)
    out = Path(out)
    weights = model.fingerprint()
    plan = {"model": model_spec, "model_fingerprint": weights,
            "source": str(Path(source).resolve()) if Path(source).exists() else str(source),
            "dtype": dtype, "part_size": part_size,
            "fingerprint": _fingerprint([model_spec, weights], items, dtype, exact_decode, part_size)}
    plan_path = out / "parts" / "plan.json"
    if plan_path.exists():
        if read_json_object(plan_path, "embedding plan", {"fingerprint": str})["fingerprint"] != plan["fingerprint"]:
            raise DataError(f"{out}: holds an unfinished embedding of other inputs or settings; "
                             "use another --out or remove it")
    elif (out / EMBED_MANIFEST).exists():
        done = read_manifest(out)
        if done.get("fingerprint") == plan["fingerprint"]:
            return done
        raise DataError(f"{out}: already holds embeddings of other inputs or settings; use another --out")
    else:
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(plan_path, plan)

    mine = [(rows, stem) for p, rows, stem in _parts(out, len(items), part_size) if p % shares == index]
    todo = [(rows, stem) for rows, stem in mine if not stem.with_suffix(".npy").exists()]
    with Progress(sum(len(rows) for rows, _ in mine), "embed", "img", disable=not progress,
                  initial=sum(len(rows) for rows, _ in mine) - sum(len(rows) for rows, _ in todo)) as bar:
        for rows, stem in todo:
            part = embed_items(model, [items[i] for i in rows], batch_size, workers, exact_decode)
            records = [items[rows[i]].record() for i in part.kept]
            records += [{"skip": items[rows[i]].id, "reason": why} for i, why in part.failed]
            write_jsonl(stem.with_suffix(".jsonl"), records)
            _write_npy(stem.with_suffix(".npy"), part.embeddings.numpy().astype(dtype))  # last: marks the part done
            bar.update(len(rows))
    parts = list(_parts(out, len(items), part_size))
    done = sum(stem.with_suffix(".npy").exists() for _, _, stem in parts)
    if done < len(parts):  # other processes' parts are still running
        return {"joined": False, "parts_done": done, "parts": len(parts)}
    if shares == 1:  # the whole run (also what joins after a sharing process was killed while joining)
        return _join_parts(out, items, passed_over, plan, model.config.embed_dim)
    try:  # of processes sharing the run, one joins: the first to create the lock
        os.close(os.open(out / "parts" / JOIN_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        if (out / EMBED_MANIFEST).exists():
            return read_manifest(out)
        return {"joined": False, "parts_done": done, "parts": len(parts), "joining": str(out / "parts" / JOIN_LOCK)}
    except FileNotFoundError:  # another process joined and retired the parts meanwhile
        return read_manifest(out)
    return _join_parts(out, items, passed_over, plan, model.config.embed_dim)


def _join_parts(out: Path, items: list[ImageItem], passed_over: list[InputSkip], plan: dict, dim: int) -> dict:
    vectors, ids, skipped = [], [], [{"id": s.id, "reason": s.reason} for s in passed_over]
    for _, _, stem in _parts(out, len(items), plan["part_size"]):
        vectors.append(np.load(stem.with_suffix(".npy")))
        for row in read_jsonl(stem.with_suffix(".jsonl")):
            if "skip" in row:
                skipped.append({"id": row["skip"], "reason": row["reason"]})
            else:
                ids.append(row)
    emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), plan["dtype"])
    _write_npy(out / "img_emb.npy", emb)
    write_jsonl(out / "ids.jsonl", ids)
    write_jsonl(out / "skipped.jsonl", skipped)
    manifest = {**{k: plan[k] for k in ("model", "model_fingerprint", "source", "dtype", "fingerprint")},
                "images": len(ids), "skipped": len(skipped), "dim": dim}
    write_json(out / EMBED_MANIFEST, manifest)
    # One rename retires all the parts at once: a kill while deleting them cannot leave half a part.
    retired = out / f".parts-done-{os.getpid()}"
    os.rename(out / "parts", retired)
    shutil.rmtree(retired, ignore_errors=True)
    return manifest


def embed_text_file(model: CLIP, model_spec: dict | str, texts_file: str | os.PathLike, out: str | os.PathLike,
                    dtype: str = "float16", batch_size: int = 256) -> dict:
    """text_emb.npy + texts.jsonl (row-aligned) for a UTF-8 file of one text per line."""
    texts = read_lines(texts_file, "texts", comments=False)
    out = Path(out)
    emb = np.concatenate([embed_texts(model, texts[i:i + 4096], batch_size)
                          for i in track(range(0, len(texts), 4096), -(-len(texts) // 4096), "embed texts", "chunk",
                                         disable=len(texts) <= 4096)])
    _write_npy(out / "text_emb.npy", emb.astype(dtype))
    write_jsonl(out / "texts.jsonl", [{"text": t} for t in texts])
    manifest = {"model": model_spec, "model_fingerprint": model.fingerprint(),
                "source": str(Path(texts_file).resolve()), "texts": len(texts),
                "dim": int(emb.shape[1]), "dtype": dtype}
    write_json(out / TEXT_MANIFEST, manifest)
    return manifest
