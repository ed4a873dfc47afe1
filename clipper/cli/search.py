"""Verbs over embedded collections: `index`, `search`, and `serve` (the HTTP API)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, DataError
from ..spec import ModelSpec
from .common import (add_config_flags, add_datastore_arg, add_model_args, flag_values, load_model_from_args,
                     model_spec, with_datastore)


def cmd_serve(args: argparse.Namespace) -> None:
    import importlib.util
    import os

    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise ConfigError("clipper serve needs FastAPI and uvicorn: pip install 'clipper[serve]'")
    from ..serve.app import serve
    from ..serve.chat import ChatService
    from ..serve.service import Service
    from ..vlm import VLM
    from ..serve.config import Access, Limits

    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else ["127.0.0.1", "localhost", "::1", args.host]
    access = Access(api_key=args.api_key or os.environ.get("CLIPPER_API_KEY") or None,
                    allowed_hosts=() if "*" in hosts else tuple(h.strip() for h in hosts if h.strip()),
                    cors_origins=tuple(o.rstrip("/") for o in args.cors_origin),
                    image_hosts=tuple(h.strip().lower() for h in args.image_host if h.strip()))
    model = load_model_from_args(args)
    with_datastore(model, args)
    if args.chat:  # a model with a llava decoder, served as the vision-language model it holds
        from ..vlm import as_vlm

        model = as_vlm(model)
        if model is None:
            raise ConfigError("--chat: for a model with a llava decoder (a VLM folder serves chat already)")
    name, limits = args.served_model_name or model_spec(args).served_name(), Limits(**flag_values(args, args.config_fields))
    if isinstance(model, VLM):  # a vision-language model serves /v1/chat/completions
        if args.index:
            raise ConfigError("--index: a vision-language model serves chat, not search")
        service = ChatService(model, name, limits, access)
    else:
        service = Service(model, name, args.index, limits, max_batch=args.max_batch, access=access,
                          media_roots=args.media_root or None)
    print(f"clipper serve: http://{args.host}:{args.port}/ (model {args.model}"
          + (f", index {args.index})" if args.index else ")"), flush=True)
    serve(service, args.host, args.port)


def cmd_index(args: argparse.Namespace) -> None:
    from ..embed_dir import read_ids
    from ..index import Index, load_vectors

    folder = Path(args.emb_dir)
    vectors = load_vectors(folder / "img_emb.npy")
    read_ids(folder, len(vectors))  # search shows these rows: they must be there, one per vector
    index = Index.build(vectors, args.kind, hnsw_m=args.hnsw_m, ef_search=args.ef_search, ivf_lists=args.ivf_lists,
                        nprobe=args.nprobe, pq_bytes=args.pq_bytes, rerank=args.rerank)
    index.save(folder)
    print(f"{args.kind} index of {len(index)} {index.dim}-d vectors in {folder}")


def cmd_search(args: argparse.Namespace) -> None:
    from ..embed import embed_images, embed_texts
    from ..embed_dir import check_same_model, open_index

    if (args.query is None) == (args.image is None):
        raise ConfigError("give a text QUERY or --image PATH (one of them)")
    folder = Path(args.index)
    index, ids, manifest = open_index(folder)
    if args.model:
        spec = model_spec(args)
    else:
        spec = ModelSpec.from_dict(manifest["model"], f"{folder}/embed.json")
        if spec.random_weights:
            raise DataError(f"{folder} was embedded with a randomly initialised {spec.model}: "
                            "its queries cannot be embedded again; pass --model")
    model = spec.load(args.device)
    check_same_model(folder, manifest, index.dim, model)
    query = embed_texts(model, [args.query]) if args.query is not None else embed_images(model, [args.image])
    result = index.search(query, args.k)
    for rank, (score, i) in enumerate(result.hits(0), 1):
        row = ids[i]
        if args.json:
            print(json.dumps({"rank": rank, "score": round(score, 6), **row}, ensure_ascii=False))
        else:
            print(f"{rank:3d}  {score:.4f}  {row['id']}" + (f"  {row['caption']}" if row.get("caption") else ""))


def cmd_datastore(args: argparse.Namespace) -> None:
    from ..data.reader import shard_captions
    from ..retrieval import build_datastore

    store = build_datastore(load_model_from_args(args), shard_captions(args.data))
    store.save(args.out)
    print(f"wrote datastore {args.out}: {len(store.captions)} captions, {store.vectors.shape[1]}-d")


def add_parsers(sub) -> None:
    p = sub.add_parser("datastore", help="captions embedded by a model's text tower, for a decoder that retrieves "
                                         "them (caption/eval --datastore)")
    add_model_args(p, precision=False)
    p.add_argument("--data", required=True, help="shards whose captions to hold (e.g. data/shards/emoji/train)")
    p.add_argument("--out", required=True, help="the datastore folder (captions.json, vectors.safetensors)")
    p.set_defaults(fn=cmd_datastore)

    p = sub.add_parser("serve", help="HTTP API (embeddings, classify, caption, search) and a demo page",
                       description="Needs the 'serve' extra (FastAPI, uvicorn). Bound to 127.0.0.1 unless --host.")
    add_model_args(p)
    p.add_argument("--index", help="folder from `clipper embed` + `clipper index`, for /search (default: "
                                     "none, /search answers 404)")
    p.add_argument("--chat", action="store_true", help="a model with a llava decoder (train-captioner --preset "
                                                      "emoji-vlm): serve /v1/chat/completions and the chat page "
                                                      "instead of the embedding API (default: the embedding API)")
    add_datastore_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="items per batched forward pass (default: 32)")
    p.add_argument("--served-model-name", help="the model's id in /v1/models and the 'model' field of "
                                               "/v1/embeddings (default: the model folder's name; RUN/model: RUN's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'X-API-Key: KEY') on every path but "
                                     "/health and the page / (default: $CLIPPER_API_KEY, else none)")
    p.add_argument("--allowed-hosts", help="comma-separated Host names requests may carry, '*' for any "
                                           "(default: loopback names and --host)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="another site whose pages may call this server (scheme://host[:port]; repeatable); "
                        "cross-site requests from others are refused (default: none)")
    p.add_argument("--image-host", action="append", default=[], metavar="HOST",
                   help="a host whose http(s) image URLs a chat request may name; the server fetches them "
                        "(repeatable; '*': any; default: none, data: URLs only)")
    p.add_argument("--media-root", action="append", default=[], metavar="DIR",
                   help="folder /thumbnail may read images from (repeatable; default: the --index folder and "
                        "the folder it was embedded from)")
    from ..serve.config import Limits

    p.set_defaults(fn=cmd_serve, config_fields=add_config_flags(p, Limits))

    p = sub.add_parser("index", help="build a search index over `clipper embed` output")
    p.add_argument("emb_dir", help="folder written by `clipper embed`")
    p.add_argument("--kind", choices=["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq"],
                   default="exact", help="exact: torch matmul (default); faiss-*: needs faiss-cpu (extra 'index'); "
                                         "faiss-ivfpq: compressed codes in memory, candidates re-ranked exactly")
    p.add_argument("--hnsw-m", type=int, default=32, help="faiss-hnsw: graph degree (default: 32)")
    p.add_argument("--ef-search", type=int, default=128, help="faiss-hnsw: search breadth (default: 128)")
    p.add_argument("--ivf-lists", type=int, help="faiss-ivf: cells (default: about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="faiss-ivf/ivfpq: cells visited per query (default: 32)")
    p.add_argument("--pq-bytes", type=int, help="faiss-ivfpq: code bytes per vector, a divisor of the dimension "
                                                "(default: dimension / 8)")
    p.add_argument("--rerank", type=int, default=8, help="faiss-ivfpq: candidates per result re-scored exactly "
                                                         "(default: 8)")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser("search", help="nearest images to a text or an image")
    p.add_argument("index", help="folder of embeddings with an index (`clipper index`)")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="image query instead of text (default: none)")
    p.add_argument("-k", type=int, default=10, help="results (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    add_model_args(p, required=False)
    p.set_defaults(fn=cmd_search)
