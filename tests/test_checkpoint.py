import os
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipper
from clipper import CheckpointError
from clipper.checkpoint import read_state_dict
from clipper.interop.open_clip import load_open_clip_checkpoint, save_open_clip_checkpoint, to_open_clip_state_dict

from clipper.io import atomic_path
from conftest import small_open_clip


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_identical(tmp_path):
    model = clipper.load("fmnist-tiny")
    model.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    again = clipper.load(tmp_path / "m")
    assert again.config == model.config and _same_tensors(model, again)
    model.save(tmp_path / "m")  # overwriting leaves no temporary files behind
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("suffix,wrap,prefix", [(".safetensors", False, ""), (".pt", True, "module."),
                                                (".bin", False, "module."), (".pth", True, "")])
def test_open_clip_files_load(tmp_path, suffix, wrap, prefix):
    oc = small_open_clip()
    sd = {prefix + k: v.contiguous() for k, v in oc.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"epoch": 3, "name": "run", "state_dict": sd} if wrap else sd, path)
    model = clipper.load(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), oc.encode_image(images), atol=1e-5)


def test_export_loads_in_open_clip(tmp_path):
    oc = small_open_clip()
    model = clipper.load(_write(tmp_path, oc))
    out = save_open_clip_checkpoint(model, tmp_path / "export.safetensors")
    fresh = small_open_clip()
    fresh.load_state_dict(open_clip.load_checkpoint.__globals__["load_state_dict"](str(out)), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in to_open_clip_state_dict(model).items())
    back = load_open_clip_checkpoint(out)
    assert _same_tensors(back, model)


def _write(tmp_path, oc):
    path = tmp_path / "oc.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    return path


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_objects_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _Payload()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: it holds pickled Python objects"):
        clipper.load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content,message", [
    ([1, 2, 3], "holds list, not a dict of tensors"),
    ({"a": torch.zeros(1), "b": 3}, "entry 'b' is a int, not a tensor"),
    ({}, "holds nothing"),
])
def test_non_tensor_dicts_are_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(tmp_path / "x.pt")


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt")


def test_weights_that_do_not_fit_the_config(tmp_path):
    model = clipper.load("fmnist-tiny")
    model.save(tmp_path / "m")
    cfg = clipper.preset("fmnist-tiny")
    cfg.text.layers = 2
    cfg.to_json(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors: weights do not fit the model config: 12 unexpected"):
        clipper.load(tmp_path / "m")


def test_pickle_module_not_used_for_loading():
    import clipper.checkpoint as ck

    src = open(ck.__file__).read()
    assert "weights_only=True" in src and "pickle.load" not in src
    assert pickle  # imported above only to name the error class in clipper.checkpoint
