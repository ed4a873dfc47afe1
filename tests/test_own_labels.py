"""A user's own labelled data: folder names or a CSV column as classes, kept in the shards with
classnames.txt, so that `clipper eval --task zeroshot` runs on them without --labels; and the
clip_benchmark layout of such a set, which clip_benchmark itself evaluates to clipper's figures."""

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clipper.cli import main
from conftest import rgb_tiny, two_class_images

CLASSES = ["blue thing", "red thing"]  # sorted, as the label indices are


def _labelled_folder(root: Path, n: int = 24, mislabel_every: int = 0) -> list[int]:
    """root/red_thing/*.png and root/blue_thing/*.png (16 px, the tiny model's size), every
    `mislabel_every`-th image in the other colour's folder; some with a caption file, the rest
    captioned by their class; plus one image outside any class folder."""
    images, colours = two_class_images(np.random.default_rng(0), n)
    labels = []
    for i, (im, colour) in enumerate(zip(images, colours)):
        flip = mislabel_every and i % mislabel_every == 0
        name = "red_thing" if (colour == 0) != flip else "blue_thing"
        (root / name).mkdir(parents=True, exist_ok=True)
        im.save(root / name / f"{i:03d}.png")
        if i % 3 == 0:
            (root / name / f"{i:03d}.txt").write_text(f"picture {i}")
        labels.append(CLASSES.index(name.replace("_", " ")))
    images[0].save(root / "stray.png")
    return labels


def _members(shards: Path, suffix: str) -> list[bytes]:
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(suffix)]
    return out


def test_folder_classes_are_kept_and_zero_shot_reads_them(tmp_path, capsys):
    labels = _labelled_folder(tmp_path / "photos")
    assert main(["data", "folder", str(tmp_path / "photos"), "--classes-from-folders", "--out", str(tmp_path / "s")]) == 0
    assert "2 classes" in capsys.readouterr().out
    assert (tmp_path / "s" / "classnames.txt").read_text().splitlines() == CLASSES
    metas = [json.loads(b) for b in _members(tmp_path / "s", ".json")]
    assert [m["label"] for m in metas] == [labels[int(Path(m["source_id"]).stem)] for m in metas]
    assert {m["class"] for m in metas} == set(CLASSES) and len(metas) == len(labels)
    captions = _members(tmp_path / "s", ".txt")
    assert b"picture 0" in captions and b"red thing" in captions and b"blue thing" in captions
    rejected = (tmp_path / "s" / "rejected.jsonl").read_text()
    assert "stray.png: not in a class folder" in rejected

    rgb_tiny().save(tmp_path / "m")
    common = ["eval", "--model", str(tmp_path / "m"), "--task", "zeroshot", "--data", str(tmp_path / "s")]
    assert main(common) == 0
    read = json.loads(capsys.readouterr().out)
    assert main(common + ["--labels", ",".join(CLASSES)]) == 0
    given = json.loads(capsys.readouterr().out)
    assert read["n"] == len(labels) and {k: read[k] for k in ("top1", "mean_per_class_recall")} == \
        {k: given[k] for k in ("top1", "mean_per_class_recall")}
    assert main(common + ["--labels", ",".join(CLASSES[::-1])]) == 0  # the other order is another labelling
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(100 - read["top1"])


def test_csv_label_column(tmp_path, capsys):
    images, _ = two_class_images(np.random.default_rng(1), 3)
    rows = ["image,caption,kind"]
    for i, (im, kind) in enumerate(zip(images, ["dog", "cat", ""])):
        im.save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,caption {i},{kind}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert main(["data", "csv", str(tmp_path / "pairs.csv"), "--label-column", "kind", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "classnames.txt").read_text().splitlines() == ["cat", "dog"]
    assert [(m["label"], m["class"]) for m in map(json.loads, _members(tmp_path / "s", ".json"))] == [(1, "dog"), (0, "cat")]
    assert "pairs.csv:4: empty kind" in (tmp_path / "s" / "rejected.jsonl").read_text()
    assert main(["data", "csv", str(tmp_path / "pairs.csv"), "--label-column", "label", "--out", str(tmp_path / "t")]) != 0
    assert "pairs.csv: no column 'label' (columns: image, caption, kind)" in capsys.readouterr().err


def test_unlabelled_set_needs_labels_for_zero_shot(tmp_path, capsys):
    images, _ = two_class_images(np.random.default_rng(2), 2)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x")
    main(["data", "folder", str(tmp_path), "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "classnames.txt").exists()
    assert main(["eval", "--model", "fmnist-tiny", "--task", "zeroshot", "--data", str(tmp_path / "s")]) != 0
    assert "--classes-from-folders or --label-column" in capsys.readouterr().err


def test_clip_benchmark_reproduces_clipper_eval_on_exports(tmp_path, capsys, monkeypatch):
    """The model as an open_clip folder, the set in clip_benchmark's layout: clip_benchmark's own
    zero-shot accuracy and mean per-class recall are clipper's."""
    clip_benchmark = pytest.importorskip("clip_benchmark.cli", reason="clip_benchmark is not installed")
    _labelled_folder(tmp_path / "photos", n=40, mislabel_every=4)  # so that no model scores 100%
    main(["data", "folder", str(tmp_path / "photos"), "--classes-from-folders", "--out", str(tmp_path / "s")])
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {}.\n")
    rgb_tiny(3).save(tmp_path / "m0")
    # a few steps on the set, so that the model tells the classes apart (a random one picks one class)
    main(["train", "--init", str(tmp_path / "m0"), "--train-data", str(tmp_path / "s"), "--steps", "12",
          "--lr", "3e-3", "--wise-ft", "1", "--out", str(tmp_path / "run")])
    capsys.readouterr()
    main(["eval", "--model", str(tmp_path / "run" / "model"), "--task", "zeroshot", "--data", str(tmp_path / "s"),
          "--templates", str(tmp_path / "t.txt")])
    ours = json.loads(capsys.readouterr().out)
    assert 55 < ours["mean_per_class_recall"] < 95 and ours["top1"] < 95  # neither one class for all nor perfect
    main(["convert", "--model", str(tmp_path / "run" / "model"), "--to", "open_clip", "--out", str(tmp_path / "oc")])
    main(["data", "clip-benchmark", str(tmp_path / "s"), "--templates", str(tmp_path / "t.txt"),
          "--samples-per-shard", "16", "--out", str(tmp_path / "cb")])
    assert (tmp_path / "cb" / "test" / "nshards.txt").read_text().strip() == "3"
    assert (tmp_path / "cb" / "zeroshot_classification_templates.txt").read_text().splitlines() == \
        ["a photo of a {c}.", "art of the {c}."]
    # its command line, in this process (torch and open_clip are imported already)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--model_type", "open_clip", "--model",
                                      f"local-dir:{tmp_path / 'oc'}", "--dataset", "wds/mine", "--dataset_root",
                                      str(tmp_path / "cb"), "--task", "zeroshot_classification", "--batch_size", "64",
                                      "--num_workers", "0", "--no_amp", "--output", str(tmp_path / "cb.json")])
    clip_benchmark.main()
    theirs = json.loads((tmp_path / "cb.json").read_text())["metrics"]
    assert theirs["acc1"] == pytest.approx(ours["top1"] / 100, abs=1e-6)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"] / 100, abs=1e-6)


def test_a_small_folder_fine_tune_with_default_flags_learns_what_it_holds_out(tmp_path, capsys):
    """`clipper train --init BASE --train-data FOLDER` with no tuning flag (only a step budget): the
    classes of images it never saw are told apart afterwards (the base, trained on the same look
    with other words, gets them all wrong); the run wrote its metrics, curves and summary and
    says what it started from; its small epoch did not restart the loader's worker every step."""
    images, colours = two_class_images(np.random.default_rng(11), 48)
    (tmp_path / "pre").mkdir()
    for i, (im, colour) in enumerate(zip(images, colours)):
        im.save(tmp_path / "pre" / f"{i}.png")
        (tmp_path / "pre" / f"{i}.txt").write_text(f"picture {i}" if i % 2 else ("a warm colour" if colour == 0
                                                                               else "a cold colour"))
    _labelled_folder(tmp_path / "mine", n=24)
    images, colours = two_class_images(np.random.default_rng(7), 24)
    for i, (im, colour) in enumerate(zip(images, colours)):  # held out: drawn anew
        folder = tmp_path / "held" / ("red_thing" if colour == 0 else "blue_thing")
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:03d}.png")
    main(["data", "folder", str(tmp_path / "pre"), "--out", str(tmp_path / "s-pre")])
    for name in ("mine", "held"):
        main(["data", "folder", str(tmp_path / name), "--classes-from-folders", "--out", str(tmp_path / f"s-{name}")])
    rgb_tiny(5).save(tmp_path / "random")
    main(["train", "--init", str(tmp_path / "random"), "--train-data", str(tmp_path / "s-pre"), "--steps", "12",
          "--lr", "3e-3", "--wise-ft", "1", "--workers", "0", "--out", str(tmp_path / "base")])
    evaluate = ["eval", "--task", "zeroshot", "--data", str(tmp_path / "s-held"), "--model"]
    capsys.readouterr()
    main(evaluate + [str(tmp_path / "base" / "model")])
    before = json.loads(capsys.readouterr().out)["mean_per_class_recall"]
    assert main(["train", "--init", str(tmp_path / "base" / "model"), "--train-data", str(tmp_path / "s-mine"),
                 "--steps", "20", "--out", str(tmp_path / "run")]) == 0
    assert "batches of 24" in capsys.readouterr().err
    main(evaluate + [str(tmp_path / "run" / "model")])
    after = json.loads(capsys.readouterr().out)["mean_per_class_recall"]
    assert before < 50 and after >= 90, (before, after)
    for name in ("metrics.jsonl", "curves.png", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["init"] == str(tmp_path / "base" / "model") and config["min_epoch_batches"] == 64
