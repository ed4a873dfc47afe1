import contextlib
import logging
import os
import shutil
import subprocess

import pytest
import torch

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every random-init model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def open_clip_models():
    """Random-init open_clip models (seeded), created once per session and shared read-only."""
    import open_clip

    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(1234)
            cache[name] = open_clip.create_model(name, pretrained=None).eval()
        return cache[name]

    return get


# 64-wide heads, open_clip's default, so the architecture can be inferred from a file's tensors.
SMALL_VISION = {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64}
SMALL_TEXT = {"context_length": 20, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}


def small_config(pool_type: str = "tok", quick_gelu: bool = False):
    from clipper.presets import from_open_clip_config

    return from_open_clip_config("small", {"embed_dim": 48, "quick_gelu": quick_gelu,
                                           "vision_cfg": SMALL_VISION | {"pool_type": pool_type},
                                           "text_cfg": SMALL_TEXT})


def small_open_clip(pool_type: str = "tok", quick_gelu: bool = False, init_logit_bias=None):
    """A small open_clip CLIP built from a config dict (cheap enough for many tests)."""
    import open_clip

    torch.manual_seed(7)
    return open_clip.CLIP(
        embed_dim=48,
        vision_cfg=SMALL_VISION | {"pool_type": pool_type},
        text_cfg=SMALL_TEXT,
        quick_gelu=quick_gelu, init_logit_bias=init_logit_bias,
    ).eval()


# A tiny RGB CLIP (16 px) for the verb, captioner and server tests.
RGB_TINY = {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
            "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}


def rgb_tiny(seed: int = 0):
    import clipper

    torch.manual_seed(seed)
    return clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).eval()


def two_class_images(rng, n: int):
    """Red-dominated (label 0) or blue-dominated (label 1) noise images, 16 px."""
    import numpy as np
    from PIL import Image

    labels = rng.integers(0, 2, n)
    images = []
    for label in labels:
        pixels = rng.integers(0, 120, (16, 16, 3))
        pixels[..., 0 if label == 0 else 2] += 135
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    return images, labels


WORDS = "a photo of the cat dog red mat small very on".split()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A word-level tokenizer as transformers saves one (tokenizer.json + tokenizer_config.json):
    lower-cased, end token appended, [SEP]-style separator for strip_sep."""
    from tokenizers import Tokenizer as RustTokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            sep_token="</s>").save_pretrained(path)
    return path


def chromium_path() -> str | None:
    """Debian's Chromium for the demo-page tests (installed here when root, as the README's setup
    would); None where it cannot be had."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return shutil.which("chromium")
    return None


@contextlib.contextmanager
def demo_page(url: str, status: str):
    """The demo page of the server at `url` in headless Chromium, once its status line shows
    `status` (the test is skipped where Playwright or Chromium cannot be had)."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs apt-get as root)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(f"document.getElementById('status').textContent.includes({status!r})")
            yield page
        finally:
            browser.close()


def noise_png(seed: int = 0, size=(20, 20)) -> bytes:
    """A PNG of seeded random pixels."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def indexed_captioner(tmp, images: int):
    """A tiny model with a caption decoder (seeded), and `images` noise PNGs in tmp/imgs embedded
    and indexed in tmp/emb: what the server tests serve."""
    import numpy as np

    import clipper
    from clipper.config import DecoderConfig
    from clipper.embed_dir import embed_folder
    from clipper.index import Index
    from clipper.tokenizer import caption_vocabulary

    torch.manual_seed(0)
    model = clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY))
    model.add_decoder(DecoderConfig(width=32, layers=1, heads=2, context_length=10,
                                    vocab=caption_vocabulary(["a red square", "a blue square"], 10)))
    model.eval()
    (tmp / "imgs").mkdir()
    for i in range(images):
        (tmp / "imgs" / f"{i}.png").write_bytes(noise_png(i))
    embed_folder(model, "test", tmp / "imgs", tmp / "emb", dtype="float32", progress=False)
    Index.build(np.load(tmp / "emb" / "img_emb.npy")).save(tmp / "emb")
    return model
