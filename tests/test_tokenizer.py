import random

import open_clip
import pytest
import torch

from clipper import Tokenizer

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
