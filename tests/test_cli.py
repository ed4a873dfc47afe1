"""The command line as a user meets it: every flag documented, settings merged in their stated
order, and every verb given a malformed artifact answering with one line that names it."""

import argparse
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import clipper
from clipper.cli import build_parser, main
from clipper.run_config import merge_train_config
from clipper.train_config import TrainConfig
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.embed_dir import embed_folder
from clipper.errors import ConfigError
from conftest import RGB_TINY, rgb_tiny


def _subparsers(parser: argparse.ArgumentParser, path: str = "clipper"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{path} {name}")


def test_every_flag_of_every_verb_has_help():
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}"
               for path, parser in _subparsers(build_parser()) for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]
    assert not missing
    # and says its default: every optional flag but switches (off unless given) and --version
    silent = [f"{path} {'/'.join(a.option_strings)}" for path, parser in _subparsers(build_parser())
              for a in parser._actions if a.option_strings and not a.required and "default" not in (a.help or "")
              and not isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction, argparse._VersionAction))]
    assert not silent
    # flags come from the config fields, defaults included
    train = dict(_subparsers(build_parser()))["clipper train"]
    flags = {s: a for a in train._actions for s in a.option_strings}
    assert "--warmup-steps" in flags and "(default: 100)" in flags["--warmup-steps"].help
    assert "--no-lock-image" in flags and "--betas" in flags


def test_train_settings_merge_in_order(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"lr": 5e-4, "augment": {"hflip": 0.5}, "steps": 7}))
    cfg = merge_train_config("emoji-small", tmp_path / "run.json", {"steps": 9},
                             ["augment.crop_scale=[0.5,1.0]", "eval_task=none"])
    preset = clipper.train_config.train_preset("emoji-small")
    assert cfg.lr == 5e-4 and cfg.steps == 9 and cfg.weight_decay == preset.weight_decay  # file over preset
    assert cfg.augment.hflip == 0.5 and cfg.augment.crop_scale == (0.5, 1.0)
    assert cfg.augment.crop_ratio == preset.augment.crop_ratio  # a nested field the file left alone
    assert merge_train_config(None, None, {"steps": 3}) == TrainConfig(steps=3)
    (tmp_path / "typo.json").write_text(json.dumps({"augment": {"hflipp": 0.5}, "steps": 1}))
    with pytest.raises(ConfigError, match="unknown field.*hflipp"):
        merge_train_config(None, tmp_path / "typo.json")
    with pytest.raises(ConfigError, match="objective.*contrastive, caption"):
        merge_train_config(None, None, {"objective": "mask", "steps": 1})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A good tiny model, images, shards and an indexed embedding folder, and a malformed copy of each."""
    root = tmp_path_factory.mktemp("artifacts")
    model = rgb_tiny()
    model.save(root / "model")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture {i}")
    write_shards([Sample(key=f"k{i}", image=Image.open(images / f"{i}.png"), text=f"picture {i}",
                         meta={"label": i % 2}) for i in range(3)], root / "shards")
    spec = {"model": str(root / "model"), "pretrained": None, "quick_gelu": None, "quantize": None}
    embed_folder(model, spec, images, root / "emb", workers=0, progress=False)
    assert main(["index", str(root / "emb")]) == 0

    bad = root / "bad"
    bad.mkdir()
    shutil.copytree(root / "model", bad / "config-model")
    (bad / "config-model" / "config.json").write_text('{"embed_dim": 32, "vision": ')
    shutil.copytree(root / "model", bad / "weights-model")
    data = (bad / "weights-model" / "model.safetensors").read_bytes()
    (bad / "weights-model" / "model.safetensors").write_bytes(data[:len(data) // 2])
    (bad / "shards").mkdir()
    (bad / "shards" / "00000.tar").write_bytes(b"\x00garbage" * 300)
    (bad / "labels.txt").write_bytes(b"caf\xe9\n")
    (bad / "templates.txt").write_text("a photo of a cat.\n")
    (bad / "texts.txt").write_bytes(b"\xff\xfe\x00")
    (bad / "nopic").mkdir()
    (bad / "nopic" / "a.txt").write_text("a caption without its image")
    (bad / "pairs.csv").write_text("path,caption\n0.png,a caption\n")
    (bad / "fake.png").write_text("not an image")
    (bad / "train.json").write_text('{"lr": 0.001,')
    for name, corrupt in [("manifest", lambda d: (d / "embed.json").write_text('{"images": 3}')),
                          ("ids", lambda d: (d / "ids.jsonl").write_text((d / "ids.jsonl").read_text().splitlines()[0])),
                          ("index", lambda d: (d / "index.json").write_text('{"kind": "exact", "count": "3"}')),
                          ("vectors", lambda d: (d / "img_emb.npy").write_bytes(b"\x93NUMPY garbage"))]:
        shutil.copytree(root / "emb", bad / f"emb-{name}")
        corrupt(bad / f"emb-{name}")
    (bad / "plan-out" / "parts").mkdir(parents=True)
    (bad / "plan-out" / "parts" / "plan.json").write_text("[1, 2]")
    return root


# (verb arguments with {root} and {bad}, the file or field the error line must name)
MALFORMED = [
    (["info", "--model", "{bad}/config-model"], "config-model/config.json"),
    (["convert", "--model", "{bad}/weights-model", "--out", "{root}/x.safetensors"], "model.safetensors"),
    (["similarity", "--model", "{root}/model", "{bad}/fake.png", "--texts", "a"], "fake.png"),
    (["embed", "{root}/images", "--model", "{bad}/config-model", "--out", "{root}/e1"], "config.json"),
    (["embed", "{root}/images", "--model", "{root}/model", "--out", "{bad}/plan-out", "--workers", "0"], "plan.json"),
    (["embed", "--texts", "{bad}/texts.txt", "--model", "{root}/model", "--out", "{root}/e2"], "texts.txt"),
    (["classify", "{root}/images", "--model", "{root}/model", "--labels-file", "{bad}/labels.txt"], "labels.txt"),
    (["classify", "{root}/images", "--model", "{root}/model", "--labels", "a,b", "--templates", "{bad}/templates.txt"],
     "templates.txt"),
    (["caption", "{root}/images/0.png", "--model", "{bad}/weights-model"], "model.safetensors"),
    (["eval", "--model", "{root}/model", "--task", "retrieval", "--data", "{bad}/shards"], "shards"),
    (["eval", "--model", "{root}/model", "--task", "zeroshot", "--data", "{root}/shards",
      "--labels-file", "{bad}/labels.txt"], "labels.txt"),
    (["index", "{bad}/emb-vectors"], "img_emb.npy"),
    (["search", "{bad}/emb-manifest", "a picture"], "embed.json"),
    (["search", "{bad}/emb-ids", "a picture"], "ids.jsonl"),
    (["search", "{bad}/emb-index", "a picture"], "index.json"),
    (["serve", "--model", "{root}/model", "--index", "{bad}/emb-ids"], "ids.jsonl"),
    (["data", "folder", "{bad}/nopic", "--out", "{root}/s1"], "nopic"),
    (["data", "csv", "{bad}/pairs.csv", "--out", "{root}/s2"], "pairs.csv"),
    (["train", "--train-data", "{bad}/shards", "--steps", "1", "--out", "{root}/r1", "--workers", "0"], "shards"),
    (["train", "--config", "{bad}/train.json", "--out", "{root}/r2"], "train.json"),
    (["train-captioner", "--init", "{bad}/weights-model", "--train-data", "{root}/shards", "--steps", "1",
      "--out", "{root}/r3", "--workers", "0"], "model.safetensors"),
]


@pytest.mark.parametrize("argv,named", MALFORMED, ids=[" ".join(a[:2]) + f" {n}" for a, n in MALFORMED])
def test_every_verb_names_a_malformed_artifact_in_one_line(artifacts, capsys, argv, named):
    argv = [a.format(root=artifacts, bad=artifacts / "bad") for a in argv]
    if argv[0] == "serve":
        pytest.importorskip("fastapi")
    assert main(argv) == 2  # a bug would raise out of main with its traceback instead
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"clipper {argv[0]}: error: ") and named in err, err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, tmp_path):
    """Only ClipperErrors are user errors: an internal ValueError keeps its traceback."""
    rgb_tiny().save(tmp_path / "m")

    def broken(*args, **kwargs):
        raise ValueError("internal")

    monkeypatch.setattr(clipper.embed, "embed_images", broken)
    with pytest.raises(ValueError, match="internal"):
        main(["similarity", "--model", str(tmp_path / "m"), "a.png", "--texts", "a"])


def test_data_index_and_checkpoint_do_not_import_the_model_package():
    """The layers below the model (data readers and writers, search, weight files) import no model code."""
    import ast
    from pathlib import Path

    root = Path(clipper.__file__).parent
    for path in [*sorted((root / "data").glob("*.py")), root / "index.py", root / "checkpoint.py"]:
        forbidden = {"model", "factory", "interop", "embed", "train", "checkpoint"} - {path.stem}
        for node in ast.parse(path.read_text()).body:  # module level: a TYPE_CHECKING import does not run
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden, f"{path.name} imports {node.module}"


@pytest.mark.parametrize("change,field", [({"vision": {"layers": 10**6}}, "vision.layers"),
                                          ({"text": {"mlp_ratio": -1}}, "text.mlp_ratio"),
                                          ({"vision": {"image_std": [0.5, float("nan"), 0.5]}}, "vision.image_std"),
                                          ({"vision": {"mlp_ratio": float("inf")}}, "vision.mlp_ratio")])
def test_model_configs_are_bounded_before_anything_is_built(tmp_path, change, field):
    config = clipper.ModelConfig.from_dict(RGB_TINY).to_dict()
    for section, values in change.items():
        config[section].update(values)
    (tmp_path / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ConfigError, match=field):
        clipper.ModelConfig.from_json(tmp_path / "config.json")


def test_index_refuses_ids_that_do_not_match_the_vectors(artifacts, capsys):
    assert main(["index", str(artifacts / "bad" / "emb-ids")]) == 2
    assert "ids.jsonl: 1 rows for 3 vectors" in capsys.readouterr().err


def test_version_and_presets_with_sizes(capsys, monkeypatch):
    import clipper
    from clipper import presets

    # three presets stand for all (listing every open_clip config takes ~10 s: not what is tested here)
    monkeypatch.setattr(presets, "list_presets", lambda: ["fmnist-tiny", "coca_ViT-B-32", "RN50"])

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"clipper {clipper.__version__}"
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "clip-bpe" in rows["fmnist-tiny"] and "coca" in rows["coca_ViT-B-32"] and "resnet 3-4-6-3" in rows["RN50"]
    assert "coca-finetune: objective caption" in out and "emoji-captioner" in out
    assert main(["presets", "fmnist-*", "--params"]) == 0
    out = capsys.readouterr().out
    assert "7.8M" in out and "RN50" not in out
    assert main(["presets", "no-such-*"]) == 2
