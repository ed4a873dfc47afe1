"""Contrastive training: losses, distributed and accumulation equivalence, resume, CLI smoke run."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import clipper
from clipper.train_config import TrainConfig
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.losses import LOSSES, infonce_loss, sigmoid_loss
from clipper.objectives import OBJECTIVES
from clipper.objectives import contrastive_forward_backward as forward_backward
from clipper.runs import RunDir
from clipper.train import Trainer

TINY = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2,
                                    "in_channels": 1, "image_mean": [0.5], "image_std": [0.5]},
        "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}


def tiny_model(bias=None):
    torch.manual_seed(0)
    cfg = clipper.ModelConfig.from_dict(TINY)
    cfg.init_logit_bias = bias
    return clipper.CLIP(cfg)


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 16, 16, generator=g)
    texts = clipper.Tokenizer(12)([f"item {i} of {'many ' * (i % 4)}things" for i in range(n)])
    return images, texts


def test_losses_are_right_on_known_logits():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    logits = scale * img @ txt.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    out = infonce_loss(img, txt, scale)
    assert torch.allclose(out["loss"], expected)
    assert torch.allclose(out["logit_pos"], logits.diagonal().mean())
    z = logits + bias
    labels = 2 * torch.eye(4) - 1
    expected = -torch.nn.functional.logsigmoid(labels * z).sum() / 4
    assert torch.allclose(sigmoid_loss(img, txt, scale, bias)["loss"], expected)
    with pytest.raises(ValueError, match="logit bias"):
        sigmoid_loss(img, txt, scale, None)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_accumulation_equals_one_big_batch(loss):
    bias = -10.0 if loss == "sigmoid" else None
    images, texts = batch()
    ref = tiny_model(bias)
    full = forward_backward(ref, images, texts, LOSSES[loss])
    acc = tiny_model(bias)
    accumulated = forward_backward(acc, images, texts, LOSSES[loss], accum_freq=2)
    assert abs(full["loss"].item() - accumulated["loss"].item()) < 1e-5
    g_ref, g_acc = _grads(ref), _grads(acc)
    assert g_ref.keys() == g_acc.keys()
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_acc[name], atol=1e-5, rtol=1e-4), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_LOSSES = {"infonce": None, "sigmoid": -10.0}  # the loss and its model's logit bias


def _rank_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for loss, bias in RANK_LOSSES.items():  # one spawn for both: starting the processes is the cost
        model = DistributedDataParallel(tiny_model(bias))
        images, texts = batch()
        per = images.shape[0] // world
        losses = forward_backward(model, images[rank * per:(rank + 1) * per], texts[rank * per:(rank + 1) * per],
                                  LOSSES[loss])
        value = losses["loss"].detach().clone()
        dist.all_reduce(value)
        if rank == 0:
            torch.save({"loss": value / world, "grads": _grads(model.module)}, f"{out_dir}/{loss}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path):
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for loss, bias in RANK_LOSSES.items():
        two = torch.load(tmp_path / f"{loss}.pt", weights_only=True)
        ref = tiny_model(bias)
        images, texts = batch()
        one = forward_backward(ref, images, texts, LOSSES[loss])
        assert abs(two["loss"].item() - one["loss"].item()) < 1e-5, loss
        g_ref = _grads(ref)
        assert g_ref.keys() == two["grads"].keys()
        for name, g in g_ref.items():
            assert torch.allclose(g, two["grads"][name], atol=1e-5, rtol=1e-4), (loss, name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two classes of 16x16 images (bright and dark) with captions naming them."""
    out = tmp_path_factory.mktemp("train-shards")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(192):
        bright = i % 2 == 0
        base = 200 if bright else 40
        image = np.clip(base + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
        samples.append(Sample(key=f"s{i:04d}", image=image, text="a bright square" if bright else "a dark square",
                              meta={"label": int(not bright)}))
    write_shards(samples, out, samples_per_shard=48)
    return out


def _cfg(shards, **kw):
    base = dict(model="fmnist-tiny", train_data=str(shards), batch_size=16, lr=3e-3, warmup_steps=2, steps=20,
                workers=0, log_every=5, checkpoint_every=10, seed=3, shuffle_buffer=50)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tiny_preset(monkeypatch):
    """Point the fmnist-tiny preset at a 16 px model so training tests stay fast."""
    from clipper import presets

    monkeypatch.setitem(presets._PRESETS, "fmnist-tiny", TINY)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("extra", [{}, {"feature_style": 0.5}, {"view_key": "caption", "view_swap": 1.0}],
                         ids=["plain", "feature-style", "view-swap"])
def test_resume_gives_identical_parameters(shards, tmp_path, tiny_preset, extra):
    straight = Trainer(_cfg(shards, **extra), tmp_path / "a")
    straight.fit()
    first = Trainer(_cfg(shards, stop_after=10, **extra), tmp_path / "b")
    first.fit()
    assert (tmp_path / "b" / "checkpoints" / "step-00000010").is_dir()
    resumed = Trainer(_cfg(shards, **extra), tmp_path / "b", resume=True)
    assert resumed.step == 10
    resumed.fit()
    a, b = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_small_set_gets_a_batch_and_warmup_that_fit(tmp_path, tiny_preset, capsys):
    """20 pairs and the default batch of 256: batches of the 20 (no pair is its own negative); the
    default warmup of 100 steps ends by a tenth of the 7-step run; the last step is logged although
    log_every is 10."""
    rng = np.random.default_rng(1)
    write_shards([Sample(key=f"k{i}", image=rng.integers(0, 256, (16, 16), dtype=np.uint8), text=f"picture {i}")
                  for i in range(20)], tmp_path / "small", samples_per_shard=10)
    trainer = Trainer(TrainConfig(model="fmnist-tiny", train_data=str(tmp_path / "small"), steps=7, workers=0),
                      tmp_path / "run")
    err = capsys.readouterr().err
    assert "batches of 20" in err
    trainer.fit()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 20
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [7]
    assert records[-1]["samples"] == 7 * 20
    from clipper.optim import learning_rate

    cfg = trainer.cfg
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(cfg.lr / 100)  # warming up
    assert learning_rate(cfg, 1, 1 / 7) > 0.9 * cfg.lr  # warm by a tenth of the run, not after 100 steps


def test_evaluations_spread_over_the_run_and_a_json_summary(shards, tmp_path, tiny_preset):
    """evals=4 over 20 steps: at 5, 10, 15 and the end, also across a resume; their time is not
    training time; summary.json is JSON; the curves have one panel per scale."""
    cfg = _cfg(shards, eval_task="retrieval", eval_data=str(shards), evals=4)
    Trainer(dataclasses.replace(cfg, stop_after=10), tmp_path / "run").fit()
    Trainer(cfg, tmp_path / "run", resume=True).fit()
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(evals, evals[1:])) and evals[0]["eval"]["t2i_R@1"] >= 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 20 and summary["eval"] == evals[-1]["eval"]
    assert summary["train_seconds"] == pytest.approx(evals[-1]["elapsed"], abs=0.1)
    from PIL import Image

    assert Image.open(tmp_path / "run" / "curves.png").width > 2 * Image.open(tmp_path / "run" / "curves.png").height


def test_half_written_checkpoint_is_never_picked(shards, tmp_path, tiny_preset):
    Trainer(_cfg(shards, stop_after=10), tmp_path / "run").fit()
    ckpts = tmp_path / "run" / "checkpoints"
    partial = ckpts / ".tmp-step-00000015-999"  # what a writer killed mid-checkpoint leaves
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "config.json").write_text("{}")
    (ckpts / "step-00000020").mkdir()  # a name without its state file is not complete either
    resumed = Trainer(_cfg(shards), tmp_path / "run", resume=True)
    assert resumed.step == 10 and not partial.exists()


def test_resume_survives_a_damaged_checkpoint_and_a_torn_log(shards, tmp_path, tiny_preset):
    """A damaged newest checkpoint is passed over for the one before; the steps after the resumed
    one are logged once; a log line torn by a kill is left out; the result equals a straight run."""
    straight = Trainer(_cfg(shards, checkpoint_every=5), tmp_path / "a")
    straight.fit()
    Trainer(_cfg(shards, checkpoint_every=5, stop_after=10, keep_checkpoints=3), tmp_path / "b").fit()
    ckpts = tmp_path / "b" / "checkpoints"
    weights = ckpts / "step-00000010" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)  # same size, other bytes
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 2.')  # cut mid-line
    resumed = Trainer(_cfg(shards, checkpoint_every=5), tmp_path / "b", resume=True)
    assert resumed.step == 5
    resumed.fit()
    a, b = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in resumed.run.read_metrics() if "loss" in r]
    assert steps == [5, 10, 15, 20]


def test_resume_refuses_another_architecture_or_batch(shards, tmp_path, tiny_preset, monkeypatch):
    Trainer(_cfg(shards, stop_after=10), tmp_path / "run").fit()
    with pytest.raises(clipper.ConfigError, match="batch_size 16, this run has 8"):
        Trainer(_cfg(shards, batch_size=8), tmp_path / "run", resume=True)
    from clipper import presets

    monkeypatch.setitem(presets._PRESETS, "fmnist-tiny", TINY | {"embed_dim": 24})
    with pytest.raises(clipper.ConfigError, match="another architecture.*embed_dim: 32 there, 24 here"):
        Trainer(_cfg(shards), tmp_path / "run", resume=True)


def test_rewriting_a_checkpoint_of_the_same_step_keeps_one_in_place(shards, tmp_path, tiny_preset):
    trainer = Trainer(_cfg(shards, steps=10), tmp_path / "run")
    trainer.fit()
    final = tmp_path / "run" / "checkpoints" / "step-00000010"
    old = final.parent / ".old-step-00000010"
    os.rename(final, old)  # as a kill between the two renames of a rewrite leaves it
    trainer.run.remove_partial()
    assert final.is_dir() and not old.exists()
    trainer.save_checkpoint()
    assert final.is_dir() and not old.exists() and RunDir.load_checkpoint(final)[1]["step"] == 10


def test_lit_with_cached_image_embeddings_trains_as_without(shards, tmp_path, tiny_preset):
    """LiT with feature_cache: each image view's frozen embedding computed once, the run the one
    computing them every step (accum_freq 2 too: its no-grad pass finds them cached). Equal to float
    rounding, not bit for bit: a view is embedded within another batch than the uncached run's, and a
    batch's size moves the matmuls' last bits."""
    from clipper.train_config import AugmentConfig

    views = AugmentConfig(crop_scale=(0.5, 1.0), views=2)
    for extra in ({}, {"accum_freq": 2}):
        plain = Trainer(_cfg(shards, steps=24, lock_image=True, augment=views, **extra), tmp_path / f"a{len(extra)}")
        plain.fit()
        cached = Trainer(_cfg(shards, steps=24, lock_image=True, augment=views, feature_cache="memory", **extra),
                         tmp_path / f"b{len(extra)}")
        found = cached.fit()["tower_features"]
        a, b = _params(plain.model), _params(cached.model)
        assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
        assert found["computed"] <= 2 * 192 and found["found"] >= 24 * 16 - 2 * 192
    with pytest.raises(clipper.ConfigError, match="feature_cache"):
        Trainer(_cfg(shards, lock_image=True, train_locked_proj=True, feature_cache="memory"), tmp_path / "c")


def test_refuses_to_overwrite_or_resume_nothing(shards, tmp_path, tiny_preset):
    Trainer(_cfg(shards, stop_after=10), tmp_path / "run").fit()
    with pytest.raises(clipper.ConfigError, match="pass --resume"):
        Trainer(_cfg(shards), tmp_path / "run")
    with pytest.raises(clipper.ConfigError, match="no complete checkpoint"):
        Trainer(_cfg(shards), tmp_path / "empty", resume=True)


def test_locked_image_tower_stays_fixed(shards, tmp_path, tiny_preset):
    trainer = Trainer(_cfg(shards, steps=3, lock_image=True), tmp_path / "lit")
    before = _params(trainer.model)
    trainer.fit()
    after = _params(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text."))


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "clipper", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_smoke_and_sigkill_resume(shards, tmp_path):
    """End to end through the CLI (real fmnist-tiny preset at 28 px): the loss falls, the run
    folder is complete; a run killed with SIGKILL resumes from its last complete checkpoint."""
    out = tmp_path / "run"
    args = ["--preset", "fmnist-tiny", "--train-data", str(shards), "--steps", "24", "--batch-size", "16",
            "--workers", "0", "--eval-task", "none", "--out", str(out), "--set", "log_every=4", "--set", "checkpoint_every=2",
            "--set", "warmup_steps=4", "--lr", "0.003"]
    proc = _run_cli(args)
    deadline = time.time() + 120
    ckpts = out / "checkpoints"
    while time.time() < deadline and len(list(ckpts.glob("step-*"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    resumed = _run_cli([*args, "--resume"])
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 24
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    for name in ["config.json", "metrics.jsonl", "curves.png", "model/config.json", "model/model.safetensors"]:
        assert (out / name).is_file(), name
    assert (ckpts / "step-00000024" / "state.pt").is_file() and not list(ckpts.glob(".tmp-*"))
    model = clipper.load(out / "model")
    assert model.config.vision.image_size == 28


def test_two_processes_with_a_step_budget_train_bit_identical_models(shards, tmp_path):
    """Training is deterministic for a given seed, thread count and step (or epoch) budget; with
    a time budget (`minutes`) the learning rate follows the clock, so two runs can differ."""
    def start(name):
        return _run_cli(["--preset", "fmnist-tiny", "--train-data", str(shards), "--steps", "12", "--batch-size", "16",
                         "--workers", "0", "--eval-task", "none", "--out", str(tmp_path / name), "--set",
                         "minutes=null", "--set", "checkpoint_every=100"])

    procs = {name: start(name) for name in ("a", "b")}  # at once: sharing the cores changes no result
    for proc in procs.values():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    a, b = ((tmp_path / name / "model" / "model.safetensors").read_bytes() for name in procs)
    assert a == b  # the same weights, and the same file bytes


def test_identical_captions_count_as_positives():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(5.0)
    unique = clipper.Tokenizer(8)(["a", "b", "c", "d"])
    assert torch.allclose(infonce_loss(img, txt, scale, tokens=unique)["loss"], infonce_loss(img, txt, scale)["loss"])
    dup = clipper.Tokenizer(8)(["a", "b", "a", "d"])
    logits = scale * img @ txt.T
    target = torch.tensor([[.5, 0, .5, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 1]])
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.T.log_softmax(1)).sum(1).mean()
    assert torch.allclose(infonce_loss(img, txt, scale, tokens=dup)["loss"], (i2t + t2i) / 2)
    labels = 2 * (target > 0).float() - 1
    expected = -torch.nn.functional.logsigmoid(labels * (logits - 1)).sum() / 4
    assert torch.allclose(sigmoid_loss(img, txt, scale, torch.tensor(-1.0), tokens=dup)["loss"], expected)


def test_fine_tune_from_open_clip_file_with_lit(shards, tmp_path, tiny_preset):
    """--init takes an open_clip checkpoint (architecture from the preset); LiT locks the image tower."""
    from clipper.interop.open_clip import save_open_clip_checkpoint

    torch.manual_seed(11)
    start = tiny_model()
    path = save_open_clip_checkpoint(start, tmp_path / "pretrained.safetensors")
    trainer = Trainer(_cfg(shards, steps=2, init=str(path), lock_image=True), tmp_path / "ft")
    loaded = _params(trainer.model)
    assert all(torch.equal(loaded[k], v) for k, v in start.state_dict().items())
    trainer.fit()
    after = _params(trainer.model)
    assert all(torch.equal(after[k], loaded[k]) for k in after if k.startswith("visual."))
    assert not torch.equal(after["text.proj"], loaded["text.proj"])


def test_torchrun_two_processes(shards, tmp_path):
    """The real entry point under torchrun: 2 gloo ranks train, rank 0 writes the run folder."""
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "clipper", "train",
           "--preset", "fmnist-tiny", "--train-data", str(shards), "--eval-task", "none", "--steps", "4",
           "--batch-size", "8", "--workers", "0", "--out", str(out), "--set", "log_every=2",
           "--set", "warmup_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[-1]["samples"] == 4 * 8 * 2  # both ranks' batches count
    assert (out / "model" / "model.safetensors").is_file()


def test_model_from_a_config_file(tmp_path):
    def build_model(cfg):
        return OBJECTIVES[cfg.objective](cfg).build_model()

    cfg = clipper.ModelConfig.from_dict(TINY)
    cfg.text.pool = "mean"
    cfg.to_json(tmp_path / "arch.json")
    model = build_model(TrainConfig(model=str(tmp_path / "arch.json"), steps=1))
    assert model.config == cfg
    (tmp_path / "bad.json").write_text(json.dumps(TINY | {"text": TINY["text"] | {"pool": "max"}}))
    with pytest.raises(clipper.config.ConfigError, match="text.pool"):
        build_model(TrainConfig(model=str(tmp_path / "bad.json"), steps=1))


def test_wise_ft_mixes_the_final_model_and_keeps_the_checkpoint(shards, tmp_path, tiny_preset):
    from clipper.interop.open_clip import save_open_clip_checkpoint

    torch.manual_seed(12)
    start = tiny_model()
    path = save_open_clip_checkpoint(start, tmp_path / "pretrained.safetensors")
    Trainer(_cfg(shards, steps=3, init=str(path), wise_ft=0.25), tmp_path / "ft").fit()
    tuned = clipper.load(tmp_path / "ft" / "checkpoints" / "step-00000003" / "model").state_dict()
    final = clipper.load(tmp_path / "ft" / "model").state_dict()
    for name, weight in start.state_dict().items():
        assert torch.allclose(final[name], 0.25 * tuned[name] + 0.75 * weight, atol=1e-6)
    assert not torch.equal(final["text.proj"], tuned["text.proj"])
