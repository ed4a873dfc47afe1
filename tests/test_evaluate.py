"""The protocol metrics on hand-made inputs, and the training-time evaluation equal to `clipper eval`."""

import json

import numpy as np
import pytest
import torch

import clipper
from clipper.cli import main
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.evaluate import classification_metrics, evaluate_task, recall_at_k


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 3, 1], [1, 0, 2]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels)
    assert m["top1"] == 75.0 and m["top3"] == 100.0 and m["n"] == 4
    assert abs(m["mean_per_class_recall"] - 100 * (1 + 1 + 0.5) / 3) < 1e-4


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    r = recall_at_k(sim, ks=(1, 2, 3))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_eval_verb_matches_direct_computation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    items = [Sample(key=f"t{i}", image=rng.integers(0, 256, (28, 28)).astype(np.uint8), text="x",
                    meta={"label": i % 10}) for i in range(30)]
    write_shards(items, tmp_path / "test", samples_per_shard=30)
    torch.manual_seed(0)
    model = clipper.load("fmnist-tiny")
    model.save(tmp_path / "m")
    direct = evaluate_task(model, "zeroshot-fmnist", str(tmp_path / "test"), batch_size=7)
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "zeroshot-fmnist",
                 "--data", str(tmp_path / "test")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in direct} == direct and direct["n"] == 30
