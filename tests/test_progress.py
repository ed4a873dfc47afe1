"""Progress when stderr is not a terminal: periodic plain lines with count, share, rate and ETA,
and no carriage returns (a log file stays readable); training logs that way too."""

import io
import sys

import pytest

from clipper.progress import Progress, track


def test_redirected_progress_writes_plain_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(4, "embed", "img", every=0) as bar:
        bar.set_postfix(loss="0.5")
        for _ in range(4):
            bar.update()
        bar.write("a note")
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert lines[0].startswith("embed: 1/4 img (25%)") and "ETA" in lines[0] and "loss 0.5" in lines[0]
    assert "a note" in lines and lines[-1].startswith("embed: 4/4 img (100%)")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(range(3), 3, "x", "it")) == [0, 1, 2]
    assert err.getvalue() == ""  # quick work (under QUIET_UNDER_S, no line due yet) stays silent
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(10, "quiet", "it", disable=True) as bar:
        bar.update(5)
    assert err.getvalue() == ""


def test_training_log_has_no_carriage_returns(tmp_path, capfd, monkeypatch):
    torch = pytest.importorskip("torch")
    import numpy as np

    from clipper.train_config import TrainConfig
    from clipper.data.samples import Sample
    from clipper.data.shards import write_shards
    from clipper.train import Trainer

    rng = np.random.default_rng(0)
    write_shards([Sample(key=f"k{i}", image=rng.integers(0, 256, (16, 16), dtype=np.uint8), text=f"p {i}")
                  for i in range(16)], tmp_path / "s", samples_per_shard=8)
    from clipper import progress

    monkeypatch.setattr(progress, "QUIET_UNDER_S", 0.0)  # a 3-step run is quick: ask for its closing line
    torch.manual_seed(0)
    Trainer(TrainConfig(model="fmnist-tiny", train_data=str(tmp_path / "s"), steps=3, batch_size=8, workers=0),
            tmp_path / "run").fit()
    err = capfd.readouterr().err
    assert "\r" not in err and "train: 3/3 step (100%)" in err and "epoch 0" not in err
