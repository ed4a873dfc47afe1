import random

import numpy as np
import open_clip
import pytest
import torch

from clipper import Tokenizer
from clipper.errors import ConfigError

ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()[]{}&<>/\\@#$%^*+=_~`|\n\t"
            "éèêëàâäôöûüçñßøåæœ—–…“”‘’«»¿¡ΑαβγδΩЖжДд日本語中文한국어🙂😀🐈🍎🇫🇷👩🏽‍🍳❤️\u200d\ufe0f")


def varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\n", "&amp; &lt;b&gt;", "a photo of a t-shirt.", "   many    spaces   ",
           "x" * 500, " ".join(["word"] * 200), "😀" * 80, "ÀÉÎÕÜ UPPER and lower"]
    while len(out) < n:
        length = rng.choice([1, 3, 10, 30, 80, 300])
        out.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return out


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_identical_to_open_clip(context_length):
    texts = varied_strings(1000)
    ours = Tokenizer(context_length)(texts)
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(texts)
    assert ours.dtype == torch.long and ours.shape == (1000, context_length)
    assert torch.equal(ours, ref)


def test_truncation_keeps_end_token():
    tok = Tokenizer(8)
    ids = tok(["one two three four five six seven eight nine ten", "short"])
    assert ids[0, -1] == tok.eot_id and ids[0, 0] == tok.sot_id
    assert ids[1].tolist()[:3] == [tok.sot_id, tok.encode("short")[0], tok.eot_id]
    assert ids.argmax(-1).tolist() == [7, 2]  # the end token is where the text encoder pools


def test_decode_round_trip():
    tok = Tokenizer()
    for text in ["a photo of a t-shirt.", "woman cook: medium-light skin tone", "hello!! world", "the cat's bag (red)"]:
        assert tok.decode(tok([text])[0]) == text
    assert tok.batch_decode(tok(["a", "b c"])) == ["a", "b c"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(1)
    with pytest.raises(TypeError, match="expected str"):
        Tokenizer()([None])


# --- Hugging Face tokenizers (SigLIP, CLIPA, ...), on tokenizer files the test builds ---------------

@pytest.mark.parametrize("clean,strip_sep", [("canonicalize", False), ("whitespace", True)])
def test_hf_tokenizer_gives_open_clips_ids(hf_folder, clean, strip_sep):
    from open_clip.tokenizer import HFTokenizer as OpenClipHF

    from clipper.config import TextConfig
    from clipper.tokenizer import tokenizer_for

    texts = ["A photo of the Cat!", "very very very small red dog on the mat mat mat", "", "zebra"]
    cfg = TextConfig(context_length=8, vocab_size=16, width=32, heads=2, layers=1, tokenizer=str(hf_folder),
                     tokenizer_clean=clean, tokenizer_strip_sep=strip_sep)
    ours = tokenizer_for(cfg)
    assert torch.equal(ours(texts), OpenClipHF(str(hf_folder), 8, clean=clean, strip_sep_token=strip_sep)(texts))
    assert ours.decode(ours(["a photo of the cat"])[0]) == "a photo of the cat"


def test_model_reads_its_hf_tokenizer_and_load_can_point_elsewhere(hf_folder, tmp_path):
    import clipper
    from clipper.tokenizer import HFTokenizer

    cfg = clipper.ModelConfig.from_dict({
        "embed_dim": 32, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"context_length": 8, "vocab_size": 16, "width": 32, "layers": 1, "heads": 2, "pool": "last",
                 "bidirectional": True, "tokenizer": "org/not-downloaded"}})
    clipper.CLIP(cfg).eval().save(tmp_path / "m")
    model = clipper.load(tmp_path / "m", tokenizer=hf_folder)
    texts = ["a red cat", "the small dog on a mat"]
    expected = torch.nn.functional.normalize(model.encode_text(HFTokenizer(str(hf_folder), 8)(texts)), dim=-1)
    assert np.allclose(model.embed_texts(texts), expected.detach().numpy(), atol=1e-6)


def test_missing_hf_tokenizer_offline_says_what_to_download(monkeypatch, tmp_path):
    from clipper import hub, tokenizer as tokenizer_module
    from clipper.config import TextConfig

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "reachable", lambda host, timeout=3.0: False)
    tokenizer_module._load_hf.cache_clear()
    cfg = TextConfig(tokenizer="timm/ViT-B-16-SigLIP")
    with pytest.raises(ConfigError, match=r"timm/ViT-B-16-SigLIP.*not in the local Hugging Face cache.*hf download"):
        tokenizer_module.tokenizer_for(cfg)
    with pytest.raises(ConfigError, match="no such folder"):
        tokenizer_module.tokenizer_for(TextConfig(tokenizer=str(tmp_path / "a" / "b" / "c")))


def test_clip_bpe_model_refuses_another_tokenizer(hf_folder):
    import clipper

    with pytest.raises(ConfigError, match="CLIP BPE"):
        clipper.load("fmnist-tiny", tokenizer=hf_folder)
