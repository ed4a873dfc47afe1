"""CoCa: coca_ViT-B-32 with random weights gives open_clip's embeddings, decoder logits and
captions (greedy and beam search, against open_clip's own `generate`), exports back exactly, and
generates alike with the KV cache and by recomputation."""

import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipper
from clipper.generate import GenerationConfig, generate
from clipper.interop.open_clip import config_from_open_clip_state_dict, from_open_clip_state_dict, to_open_clip_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from peer import run_open_clip_generate  # noqa: E402

NAME = "coca_ViT-B-32"
TEXTS = ["a photo of a cat.", "", "wow!! a dog on the grass", " ".join(["word"] * 100), "a"]


@pytest.fixture(scope="module")
def pair():
    """(clipper's random coca_ViT-B-32, open_clip's CoCa holding the exported weights)."""
    from open_clip.coca_model import CoCa

    torch.manual_seed(0)
    ours = clipper.load(NAME)
    cfg = {k: v for k, v in open_clip.get_model_config(NAME).items() if k != "custom_text"}
    with torch.device("meta"):  # no random init: every tensor is assigned
        oc = CoCa(**cfg)
    oc.load_state_dict(to_open_clip_state_dict(ours), strict=True, assign=True)
    oc.text.attn_mask = oc.text.build_causal_mask()  # buffers outside the state dict
    oc.text_decoder.attn_mask = oc.text_decoder.build_attention_mask()
    return ours, oc.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(len(TEXTS), 3, 224, 224, generator=torch.Generator().manual_seed(5))


def test_embeddings_and_export_are_open_clips(pair, images):
    ours, oc = pair
    tokens = open_clip.get_tokenizer(NAME)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images, normalize=True), oc.encode_image(images),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens, normalize=True), oc.encode_text(tokens),
                                   atol=1e-5, rtol=0)
        # one pass for both (joint training) gives the same features
        feats, _ = ours.text.encode(tokens)
        torch.testing.assert_close(torch.nn.functional.normalize(feats, dim=-1), oc.encode_text(tokens),
                                   atol=1e-5, rtol=0)
    exported = to_open_clip_state_dict(ours)
    assert all(torch.equal(exported[k], v) for k, v in oc.state_dict().items())
    assert config_from_open_clip_state_dict(oc.state_dict()) == ours.config
    back = from_open_clip_state_dict(oc.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_teacher_forced_logits_and_loss_are_open_clips(pair, images):
    from open_clip.loss import CoCaLoss

    ours, oc = pair
    tokens = open_clip.get_tokenizer(NAME)(TEXTS)
    with torch.no_grad():
        out = oc(images, tokens)
        _, image_tokens = ours.visual.encode(images)
        states = ours.text.states(tokens)
        logits = ours.decoder(image_tokens, states)
        for row, end in enumerate(tokens.argmax(-1).tolist()):
            torch.testing.assert_close(logits[row, :end], out["logits"][row, :end], atol=1e-4, rtol=0)
        ref = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(**out, output_dict=True)
        mine = ours.decoder.loss(image_tokens, tokens, states)["loss"]
    assert abs(mine.item() - ref["caption_loss"].item()) < 1e-4


def test_cached_logits_follow_open_clips_forward(pair, images):
    """Every step of a 20-token greedy generation (a prompt with '!', i.e. padding id 0, inside):
    the cached logits equal open_clip's forward on the same prefix."""
    ours, oc = pair
    captioner = ours.captioner()
    pixels = images[:2]
    prompt = torch.tensor([[49406, 2781, 0, 320]] * 2)  # start, "wow", "!" (id 0, open_clip's padding), "a"
    with torch.inference_mode():
        image_tokens = ours.visual.tokens(pixels)
        logits, cache = captioner.prefill(image_tokens, prompt, torch.ones_like(prompt, dtype=torch.bool), 20)
        tokens = prompt
        for _ in range(20):
            ref = oc(pixels, tokens, output_labels=False)["logits"][:, -1]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logits = captioner.decode(nxt, cache)


def _bpe_rows(model, pixels, cfg):
    """Generated BPE ids per image (the prompt-free captions, re-tokenized)."""
    tok = clipper.Tokenizer(76)
    return [tok.encode(c[0]) for c in generate(model, pixels, None, cfg)]


@pytest.mark.slow  # benchmarks/decode.py --model coca_ViT-B-32 checks the same (greedy and beam 3) every run
def test_captions_equal_open_clips_generate(pair, images, tmp_path):
    ours, _ = pair
    pixels = images[:3]
    save_file({k: v.contiguous() for k, v in to_open_clip_state_dict(ours).items()}, tmp_path / "w.safetensors")
    save_file({"images": pixels.contiguous()}, tmp_path / "images.safetensors")
    runs = [dict(generation_type="top_k", top_k=1, seq_len=14, min_seq_len=5),
            dict(generation_type="beam_search", num_beams=3, num_beam_groups=1, seq_len=9, min_seq_len=3)]
    peer = run_open_clip_generate(NAME, tmp_path / "w.safetensors", tmp_path / "images.safetensors", runs,
                                  tmp_path / "out.json")
    if isinstance(peer, str):
        pytest.skip(peer)

    def strip(row):  # open_clip's rows: start, caption, end, padding
        row = row[1:]
        return row[:row.index(49407)] if 49407 in row else row

    greedy = generate(ours, pixels, None, GenerationConfig(max_new_tokens=12, min_new_tokens=4))
    beam = generate(ours, pixels, None, GenerationConfig(max_new_tokens=8, min_new_tokens=2, num_beams=3,
                                                         beam_score="logit"))
    tok = clipper.Tokenizer(76)
    for got, ref in ((greedy, peer["runs"][0]["tokens"]), (beam, peer["runs"][1]["tokens"])):
        assert [tok.decode(strip(r)) for r in ref] == [c[0] for c in got]


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2, "repetition_penalty": 1.2},
                                     {"do_sample": True, "seed": 3, "top_k": 50, "top_p": 0.9, "temperature": 0.8,
                                      "num_return_sequences": 2}])
def test_cached_generation_equals_recompute(pair, images, options):
    ours, _ = pair
    pixels, prompts = images[:2], ["", "a photo of"]
    cfg = dict(max_new_tokens=6, **options)
    cached = generate(ours, pixels, prompts, GenerationConfig(**cfg))
    assert cached == generate(ours, pixels, prompts, GenerationConfig(use_cache=False, **cfg))
    assert all(c.startswith(p) for p, row in zip(prompts, cached) for c in row)


# A tiny CoCa in open_clip's config format (16 px images), for training tests.
TINY_COCA = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16,
                            "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 9,
                            "output_tokens": True},
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_tiny_coca_matches_open_clip_and_fine_tunes_jointly(tmp_path):
    """The joint objective (contrastive x 1 + caption x 2, open_clip's CoCa weights) on a tiny CoCa
    lowers both terms, equals open_clip's CoCaLoss on the same weights and batch, and resumes exactly."""
    import numpy as np
    from open_clip.coca_model import CoCa
    from open_clip.loss import CoCaLoss

    from clipper.presets import from_open_clip_config
    from clipper.train_config import TrainConfig
    from clipper.data.samples import Sample
    from clipper.data.shards import write_shards
    from clipper.objectives import Caption
    from clipper.train import Trainer
    from conftest import two_class_images

    torch.manual_seed(0)
    model = clipper.CLIP(from_open_clip_config("tiny-coca", TINY_COCA))
    oc = CoCa(**{k: v for k, v in TINY_COCA.items() if k != "custom_text"})
    oc.load_state_dict(to_open_clip_state_dict(model), strict=True)
    images = torch.randn(4, 3, 16, 16)
    tokens = clipper.Tokenizer(12)(["a red square", "a blue square", "a red square!!", "a"])
    cfg = TrainConfig(objective="caption", init="x", contrastive_weight=1.0, caption_weight=2.0, steps=1)
    objective = Caption(cfg)
    ours = objective.forward_backward(objective.module(model.train()), images, tokens)
    ref = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(**oc.train()(images, tokens), output_dict=True)
    assert abs(ours["contrastive_loss"].item() - ref["contrastive_loss"].item()) < 1e-5
    assert abs(2 * ours["caption_loss"].item() - ref["caption_loss"].item()) < 1e-4

    rng = np.random.default_rng(3)
    pictures, labels = two_class_images(rng, 48)
    captions = ["a red square", "a blue square"]
    write_shards([Sample(key=f"k{i}", image=im, text=captions[y]) for i, (im, y) in enumerate(zip(pictures, labels))],
                 tmp_path / "shards", samples_per_shard=12)
    model.eval().save(tmp_path / "coca")
    run = dict(objective="caption", init=str(tmp_path / "coca"), train_data=str(tmp_path / "shards"), batch_size=12,
               steps=16, workers=0, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=8, lock_image=False,
               contrastive_weight=1.0, caption_weight=2.0)
    Trainer(TrainConfig(**run), tmp_path / "straight").fit()
    import json
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "caption_loss" in r]
    for term in ("contrastive_loss", "caption_loss"):
        first, last = np.mean([r[term] for r in steps[:3]]), np.mean([r[term] for r in steps[-3:]])
        assert last < 0.8 * first, (term, first, last)
    Trainer(TrainConfig(**run, stop_after=8), tmp_path / "resumed").fit()
    Trainer(TrainConfig(**run), tmp_path / "resumed", resume=True).fit()
    a = clipper.load(tmp_path / "straight" / "model").state_dict()
    b = clipper.load(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = clipper.load(tmp_path / "coca").state_dict()
    for name in ("text.transformer.blocks.0.mlp.fc.weight", "decoder.cross.0.attn.qkv.weight", "logit_scale"):
        assert not torch.equal(a[name], before[name]), name  # the joint objective trains every part


def test_tiny_coca_captions_through_the_server():
    """/caption on a CoCa model: the captions `clipper.generate` writes, prompt and beams included."""
    import base64
    import io
    import json
    import urllib.request

    import numpy as np
    from PIL import Image

    pytest.importorskip("fastapi")
    from clipper.presets import from_open_clip_config
    from clipper.serve.config import Limits
    from clipper.serve.service import Service
    from clipper.serve.testing import serve_in_thread

    torch.manual_seed(1)
    model = clipper.CLIP(from_open_clip_config("tiny-coca", TINY_COCA)).eval()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    url, stop = serve_in_thread(Service(model, "tiny-coca", None, Limits()))
    try:
        body = {"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "a photo of",
                "options": {"num_beams": 2, "max_new_tokens": 5}}
        req = urllib.request.Request(url + "/caption", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            captions = json.loads(r.read())["captions"]
    finally:
        stop()
    assert captions == model.caption(picture, "a photo of", num_beams=2, max_new_tokens=5)
