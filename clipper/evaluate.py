"""The protocol metrics (docs/protocol.md, "Data"): zero-shot classification with template ensembling,
and image<->text retrieval recall@k; on the protocol's sets or on any labelled / paired shards."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .data.fashion_mnist import CLASSES, EVAL_TEMPLATES
from .errors import ConfigError, DataError
from .model import CLIP
from .progress import Progress


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (or top-C when fewer classes) and mean per-class recall, in percent."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = topk[:, 0] == labels
    recalls = [top1[labels == c].float().mean() for c in labels.unique()]
    return {"top1": 100 * top1.float().mean().item(), f"top{k}": 100 * (topk == labels[:, None]).any(1).float().mean().item(),
            "mean_per_class_recall": 100 * torch.stack(recalls).mean().item(), "n": int(labels.numel())}


@torch.inference_mode()
def zero_shot(model: CLIP, batches: Iterable[dict], classnames: Sequence[str],
              templates: Sequence[str] | None = None) -> dict[str, float]:
    """Zero-shot accuracy over eval batches whose metadata hold the class: its index in
    `classnames` ("label") or its name ("class")."""
    device = model.device
    from .embed import label_embeddings  # late, as the data pipeline: `clipper --help` reads EVAL_TASKS

    classes = label_embeddings(model, classnames, templates).to(device)
    position = {name: i for i, name in enumerate(classnames)}
    logits, labels = [], []
    for batch in batches:
        if not batch["key"]:
            continue
        logits.append(model.encode_image(batch["image"].to(device), normalize=True).float() @ classes.T)
        labels.extend(_class_index(m, key, position) for m, key in zip(batch["meta"], batch["key"]))
    if not labels:
        raise DataError("zero-shot evaluation: no images")
    return classification_metrics(torch.cat(logits).cpu(), torch.tensor(labels))


def _class_index(meta: dict, key: str, position: dict[str, int]) -> int:
    from .data.shards import class_index

    label = class_index(meta, position)
    if label is not None:
        return label
    raise DataError(f"sample {key}: its json needs 'label' (an index into the {len(position)} classes) "
                     f"or 'class' (one of them), got {json.dumps(meta)[:200]}")


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent for queries (rows) whose match is the same-index column."""
    target = similarity.diagonal()[:, None]
    rank = (similarity > target).sum(dim=1)  # how many candidates beat the true match
    return {f"R@{k}": 100 * (rank < k).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval(model: CLIP, batches: Iterable[dict]) -> dict[str, float]:
    """Text->image and image->text recall@1/5/10 over paired eval batches (query i matches item i)."""
    device = model.device
    images, texts = [], []
    for batch in batches:
        if not batch["key"]:
            continue
        images.append(model.encode_image(batch["image"].to(device), normalize=True))
        texts.append(model.encode_text(batch["text"].to(device), normalize=True))
    if not images:
        raise DataError("retrieval evaluation: no pairs")
    sim = (torch.cat(texts) @ torch.cat(images).T).cpu()
    t2i, i2t = recall_at_k(sim), recall_at_k(sim.T)
    return {**{f"t2i_{k}": v for k, v in t2i.items()}, **{f"i2t_{k}": v for k, v in i2t.items()}, "n": sim.shape[0]}


def simple_tokens(text: str) -> list[str]:
    """Lowercased words without punctuation: the tokenization the caption metrics compare."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def named_class(caption: str, classnames: Sequence[str]) -> int | None:
    """The class a caption names (longest name first, so 't-shirt' is not read as 'shirt')."""
    text = caption.lower()
    for name in sorted(classnames, key=len, reverse=True):
        if re.search(r"(?<![\w-])" + re.escape(name.lower()) + r"(?![\w-])", text):
            return list(classnames).index(name)
    return None


def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, BLEU-4, ROUGE-L and CIDEr-D (pycocoevalcap's scorers, on `simple_tokens`:
    no Java), in percent, of one prediction against one reference per image."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ConfigError("captioning metrics need pycocoevalcap: pip install 'clipper[caption]'") from None
    if len(predictions) != len(references) or not predictions:
        raise ValueError("caption metrics: need one prediction per reference (and at least one)")
    res = {i: [" ".join(simple_tokens(p)) or "empty"] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(simple_tokens(r))] for i, r in enumerate(references)}
    exact = sum(res[i] == gts[i] for i in res) / len(res)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    rouge = Rouge().compute_score(gts, res)[0]
    cider = Cider().compute_score(gts, res)[0]
    return {"exact_match": 100 * exact, "bleu4": 100 * bleu, "rouge_l": 100 * rouge, "cider_d": 100 * cider,
            "n": len(predictions)}


@torch.inference_mode()
def captioning(model: CLIP, batches: Iterable[dict], classnames: Sequence[str] | None = None,
               generation=None) -> dict[str, float]:
    """Caption every eval image (greedy unless `generation` says otherwise) and score against its
    caption; with `classnames`, also the share of captions naming the image's class."""
    from .generate import generate

    device = model.device
    position = {name: i for i, name in enumerate(classnames or ())}
    predictions, references, labels = [], [], []
    for batch in batches:
        if not batch["key"]:
            continue
        predictions += [c[0] for c in generate(model, batch["image"].to(device), cfg=generation)]
        references += batch["caption"]
        if classnames is not None:
            labels += [_class_index(m, k, position) for m, k in zip(batch["meta"], batch["key"])]
    if not predictions:
        raise DataError("captioning evaluation: no images")
    metrics = caption_metrics(predictions, references)
    if classnames is not None:
        named = [named_class(p, classnames) == y for p, y in zip(predictions, labels)]
        metrics["class_named"] = 100 * sum(named) / len(named)
    metrics["examples"] = [{"caption": p, "reference": r} for p, r in list(zip(predictions, references))[:8]]
    return metrics


@torch.inference_mode()
def cross_style(model: CLIP, batches: Iterable[dict], style: str, query_style: str = "noto") -> dict[str, float]:
    """Image->image recall across renderings: each emoji drawn in `query_style` is the query, the
    emoji drawn in `style` the gallery (matched by code points), over the emoji both have."""
    device = model.device
    found: dict[str, dict[str, torch.Tensor]] = {query_style: {}, style: {}}
    for batch in batches:
        keep = [i for i, m in enumerate(batch["meta"]) if m.get("style", "noto") in found]
        if not keep:
            continue
        emb = model.encode_image(batch["image"][keep].to(device), normalize=True).cpu()
        for row, i in zip(emb, keep):
            meta = batch["meta"][i]
            found[meta.get("style", "noto")][meta.get("cp", batch["key"][i])] = row
    shared = sorted(set(found[query_style]) & set(found[style]))
    if not shared:
        raise DataError(f"cross-style evaluation: no emoji drawn both in {query_style} and in {style}")
    queries = torch.stack([found[query_style][c] for c in shared])
    gallery = torch.stack([found[style][c] for c in shared])
    return {**{f"i2i_{k}": v for k, v in recall_at_k(queries @ gallery.T).items()}, "n": len(shared),
            "query_style": query_style, "gallery_style": style}


def only_style(batches: Iterable[dict], style: str) -> Iterator[dict]:
    """The batches' samples drawn in `style` (json "style"; shards without one are Noto emoji)."""
    for batch in batches:
        keep = [i for i, m in enumerate(batch["meta"]) if m.get("style", "noto") == style]
        yield {k: v if k == "skipped" else (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep])
               for k, v in batch.items()}


@dataclass(frozen=True)
class EvalTask:
    """An evaluation: `run(model, batches, **inputs)` -> metrics, on shards of the kind `data` says.
    `inputs`: which of the user's class names / templates / style it takes; `required`: those it
    cannot run without; `captions`: it scores generated captions (the model needs a decoder). A
    task that does not take `style` runs on the samples of that style when one is given."""
    run: Callable[..., dict]
    data: str
    inputs: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    captions: bool = False


EVAL_TASKS: dict[str, EvalTask] = {
    "zeroshot-fmnist": EvalTask(partial(zero_shot, classnames=CLASSES, templates=EVAL_TEMPLATES),
                                "the Fashion-MNIST test shards; the protocol's class names and templates"),
    "retrieval-emoji": EvalTask(retrieval, "the emoji test shards (text->image with the tts names; --style S: "
                                           "of one rendering)"),
    "cross-style-emoji": EvalTask(cross_style, "emoji shards with Noto and --style S renderings (a Noto emoji's "
                                               "image as the query, S's images as the gallery; image->image R@k)",
                                  inputs=("style",), required=("style",)),
    "captioning-emoji": EvalTask(captioning, "the emoji test shards, captions against the tts names",
                                 inputs=("classnames",), captions=True),
    "captioning-fmnist": EvalTask(partial(captioning, classnames=CLASSES),
                                  "the Fashion-MNIST test shards (and the share of captions naming the class)",
                                  captions=True),
    "zeroshot": EvalTask(zero_shot, "any shards whose json holds 'label' (index) or 'class' (name); --labels "
                                    "(default: the set's classnames.txt) and --templates (default: the set's "
                                    "templates.txt, else 'a photo of a {}.')",
                         inputs=("classnames", "templates"), required=("classnames",)),
    "retrieval": EvalTask(retrieval, "any (image, caption) shards"),
    "captioning": EvalTask(captioning, "any (image, caption) shards; with --labels also the share naming the class",
                           inputs=("classnames",), captions=True),
}


def evaluate_task(model: CLIP, task: str, data: str, batch_size: int = 512, workers: int = 0,
                  classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                  style: str | None = None, allow_pipe: bool | None = None) -> dict[str, float]:
    """Run one evaluation of EVAL_TASKS on eval-split shards (the same code as `clipper eval`)."""
    if task not in EVAL_TASKS:
        raise ConfigError(f"unknown evaluation task {task!r} (one of {', '.join(EVAL_TASKS)})")
    spec = EVAL_TASKS[task]
    from .data.shards import CLASSNAMES_FILE, TEMPLATES_FILE, read_set_lines

    # a labelled set names its classes, and may carry its prompt templates
    if not classnames and "classnames" in spec.inputs:
        classnames = read_set_lines(data, CLASSNAMES_FILE)
    if not templates and "templates" in spec.inputs:
        templates = read_set_lines(data, TEMPLATES_FILE)
    given = {"classnames": list(classnames) if classnames else None, "templates": templates, "style": style}
    missing = [name for name in spec.required if not given[name]]
    if missing:
        raise ConfigError(f"task {task}: give " + ("the class names (--labels or --labels-file; a set made with "
                                                    "--classes-from-folders or --label-column has them)"
                                                    if "classnames" in missing else
                                                    "--style (the rendering to compare with)"))
    if spec.captions and model.decoder is None:
        raise ConfigError(f"task {task}: the model has no caption decoder")
    was_training = model.training
    model.eval()
    tokenizer = model.decoder.training_tokenizer() if spec.captions else None
    from .data.pipeline import ShardDataset, SkipLog, make_loader  # torchvision: ~1.5 s to import

    dataset = ShardDataset(data, model.config, batch_size, train=False, rank=0, world=1, tokenizer=tokenizer,
                           allow_pipe=allow_pipe)
    skips = SkipLog()

    def batches() -> Iterator[dict]:
        with Progress(dataset.num_samples, f"eval {task}", "img") as bar:
            for batch in make_loader(dataset, workers):
                skips.add(batch)
                bar.update(len(batch["image"]) + len(batch["skipped"]))
                yield batch

    rows = batches() if style is None or "style" in spec.inputs else only_style(batches(), style)
    try:
        metrics = spec.run(model, rows, **{name: given[name] for name in spec.inputs})
        metrics["skipped"] = len(skips.skipped)
        if skips.skipped:
            metrics["skipped_summary"] = skips.summary()
        return metrics
    except DataError as e:  # name the shards, and what was skipped in them
        raise DataError(f"{data}: {e} ({skips.summary()})") from None
    finally:
        model.train(was_training)
