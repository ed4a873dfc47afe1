"""The protocol metrics (design.md section 3): zero-shot classification with template ensembling,
and image<->text retrieval recall@k."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .config import ConfigError
from .data.fashion_mnist import CLASSES, EVAL_TEMPLATES
from .data.pipeline import ShardDataset, make_loader
from .model import CLIP
from .tokenizer import Tokenizer


@torch.inference_mode()
def class_embeddings(model: CLIP, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised template embeddings, re-normalised."""
    tokenizer = Tokenizer(model.config.text.context_length)
    texts = [t.format(c) for c in classnames for t in templates]
    device = next(model.parameters()).device
    emb = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True)
                     for i in range(0, len(texts), batch_size)])
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (or top-C when fewer classes) and mean per-class recall, in percent."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = topk[:, 0] == labels
    recalls = [top1[labels == c].float().mean() for c in labels.unique()]
    return {"top1": 100 * top1.float().mean().item(), f"top{k}": 100 * (topk == labels[:, None]).any(1).float().mean().item(),
            "mean_per_class_recall": 100 * torch.stack(recalls).mean().item(), "n": int(labels.numel())}


@torch.inference_mode()
def zero_shot(model: CLIP, batches: Iterable[dict], classnames: Sequence[str], templates: Sequence[str],
              label_field: str = "label") -> dict[str, float]:
    """Zero-shot accuracy over eval batches whose metadata hold the class index."""
    classes = class_embeddings(model, classnames, templates)
    device = classes.device
    logits, labels = [], []
    for batch in batches:
        if not batch["key"]:
            continue
        logits.append(model.encode_image(batch["image"].to(device), normalize=True) @ classes.T)
        labels.extend(m[label_field] for m in batch["meta"])
    if not labels:
        raise ValueError("zero-shot evaluation: no images")
    return classification_metrics(torch.cat(logits).cpu(), torch.tensor(labels))


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent for queries (rows) whose match is the same-index column."""
    target = similarity.diagonal()[:, None]
    rank = (similarity > target).sum(dim=1)  # how many candidates beat the true match
    return {f"R@{k}": 100 * (rank < k).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval(model: CLIP, batches: Iterable[dict]) -> dict[str, float]:
    """Text->image and image->text recall@1/5/10 over paired eval batches (query i matches item i)."""
    device = next(model.parameters()).device
    images, texts = [], []
    for batch in batches:
        if not batch["key"]:
            continue
        images.append(model.encode_image(batch["image"].to(device), normalize=True))
        texts.append(model.encode_text(batch["text"].to(device), normalize=True))
    if not images:
        raise ValueError("retrieval evaluation: no pairs")
    sim = (torch.cat(texts) @ torch.cat(images).T).cpu()
    t2i, i2t = recall_at_k(sim), recall_at_k(sim.T)
    return {**{f"t2i_{k}": v for k, v in t2i.items()}, **{f"i2t_{k}": v for k, v in i2t.items()}, "n": sim.shape[0]}


def evaluate_task(model: CLIP, task: str, data: str, batch_size: int = 512, workers: int = 0) -> dict[str, float]:
    """Run one protocol evaluation on eval-split shards (the same code as `clipper eval`)."""
    was_training = model.training
    model.eval()
    dataset = ShardDataset(data, model.config, batch_size, train=False, rank=0, world=1)
    loader = make_loader(dataset, workers)
    try:
        if task == "zeroshot-fmnist":
            return zero_shot(model, loader, CLASSES, EVAL_TEMPLATES)
        if task == "retrieval-emoji":
            return retrieval(model, loader)
        raise ConfigError(f"unknown evaluation task {task!r}")
    finally:
        model.train(was_training)
