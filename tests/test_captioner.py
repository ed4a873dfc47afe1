"""The captioner: KV-cache generation equals full recomputation, beam 1 equals greedy, stopping
rules, a tiny captioner that learns two captions, the verbs, and the caption metrics."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipper
from clipper.cli import main
from clipper.config import DecoderConfig
from clipper.data.samples import Sample
from clipper.data.shards import write_shards
from clipper.data.transforms import Preprocess
from clipper.evaluate import caption_metrics, named_class
from clipper.generate import GenerationConfig, generate
from clipper.objectives import CaptionModel
from clipper.tokenizer import Tokenizer, caption_vocabulary
from conftest import RGB_TINY, two_class_images

CAPTIONS = ["a red square", "a blue square"]
PROMPTS = ["", "a photo of", "a red", "a very very small"]


def captioner(vocab=(), seed=0):
    torch.manual_seed(seed)
    model = clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY))
    model.add_decoder(DecoderConfig(width=32, layers=2, heads=2, context_length=16, vocab=tuple(vocab)))
    return model.eval()


def _vocab():
    return caption_vocabulary(CAPTIONS + PROMPTS + ["photo of very small dog"], 16)


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "min_new_tokens": 4},
                                     {"num_beams": 3, "num_return_sequences": 2},
                                     {"do_sample": True, "seed": 3, "top_k": 5, "top_p": 0.9, "temperature": 0.7,
                                      "num_return_sequences": 2}])
def test_cached_generation_equals_full_recompute(options):
    model = captioner(_vocab())
    pixels = torch.randn(4, 3, 16, 16)
    cfg = dict(max_new_tokens=7, **options)
    cached = generate(model, pixels, PROMPTS, GenerationConfig(**cfg))
    recomputed = generate(model, pixels, PROMPTS, GenerationConfig(use_cache=False, **cfg))
    assert cached == recomputed
    assert all(c.startswith(p) for p, row in zip(PROMPTS, cached) for c in row)


def test_int8_captioner_cache_equals_its_recompute():
    """The decode step binds each block's linear layers once per generation; int8 layers (not
    nn.Linear) go through their own forward, on both paths alike."""
    from clipper.quantize import quantize_int8

    model = captioner(_vocab())
    quantized = quantize_int8(model)
    assert type(quantized.decoder.blocks[0].attn.qkv).__name__ == "Int8Linear"
    pixels = torch.randn(4, 3, 16, 16)
    cached = generate(quantized, pixels, PROMPTS, GenerationConfig(max_new_tokens=7))
    assert cached == generate(quantized, pixels, PROMPTS, GenerationConfig(max_new_tokens=7, use_cache=False))
    # the step reads the weights at generation time: new weights loaded in place are used
    reference = generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=7))
    other = captioner(_vocab(), seed=1)
    model.load_state_dict(other.state_dict())
    assert generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=7)) == \
        generate(other, pixels, PROMPTS, GenerationConfig(max_new_tokens=7)) != reference


def test_left_padding_changes_nothing():
    """Each image with its prompt alone gives what it gives inside a batch of mixed prompt lengths."""
    model = captioner(_vocab())
    pixels = torch.randn(4, 3, 16, 16)
    batch = generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=6))
    alone = [generate(model, pixels[i:i + 1], [p], GenerationConfig(max_new_tokens=6))[0] for i, p in enumerate(PROMPTS)]
    assert batch == alone


@pytest.mark.parametrize("padded", [True, False])  # unpadded: decode attends without any mask
def test_cache_logits_match_recompute_step_by_step(padded):
    model = captioner()
    decoder = model.decoder
    image_tokens = model.visual.tokens(torch.randn(2, 3, 16, 16))
    tokens = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    valid = torch.tensor([[not padded, not padded, True, True], [True, True, True, True]])
    with torch.inference_mode():
        logits, cache = decoder.prefill(image_tokens, tokens, valid, 3)
        for step in range(3):
            full = decoder.full_logits(image_tokens, tokens, valid)
            assert torch.allclose(logits, full, atol=1e-5)
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            valid = torch.cat([valid, valid.new_ones(2, 1)], 1)
            logits = decoder.decode(nxt, cache)
        with pytest.raises(ValueError, match="cache is full"):
            decoder.decode(nxt, cache)


def test_beam_width_one_is_greedy_and_limits_hold():
    model = captioner(_vocab())
    pixels = torch.randn(4, 3, 16, 16)
    greedy = generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=5))
    beam = generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=5, num_beams=1))
    assert greedy == beam
    tok = Tokenizer(16)
    for prompt, (text,) in zip(PROMPTS, greedy):
        assert len(tok.encode(text)) - len(tok.encode(prompt)) <= 5  # at most max_new_tokens
    with pytest.raises(ValueError, match="room"):
        generate(model, pixels, PROMPTS, GenerationConfig(max_new_tokens=15))
    with pytest.raises(ValueError, match="not in the captioner's vocabulary"):
        generate(model, pixels[:1], ["zebra"], GenerationConfig())


def test_tiny_captioner_learns_two_captions(tmp_path):
    rng = np.random.default_rng(0)
    model = captioner(caption_vocabulary(CAPTIONS, 16)).train()
    transform, tok = Preprocess(model.config.vision), Tokenizer(16)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith(("decoder.", "visual."))], lr=3e-3)
    losses = []
    for _ in range(60):
        images, labels = two_class_images(rng, 16)
        out = CaptionModel(model, train_image=True)(torch.stack([transform(im) for im in images]),
                                                     tok([CAPTIONS[i] for i in labels]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
    model.eval()
    images, labels = two_class_images(rng, 10)
    assert model.caption(images) == [CAPTIONS[i] for i in labels]  # and it stopped at end-of-text
    longer = model.caption(images[:2], min_new_tokens=5, max_new_tokens=6)
    assert all(len(tok.encode(c)) >= 5 for c in longer)
    # a model directory keeps the decoder; captions come back the same
    model.save(tmp_path / "m")
    assert clipper.load(tmp_path / "m").caption(images) == [CAPTIONS[i] for i in labels]
    for i, im in enumerate(images[:3]):
        im.save(tmp_path / f"{i}.png")
    assert main(["caption", *[str(tmp_path / f"{i}.png") for i in range(3)], "--model", str(tmp_path / "m"),
                 "--json", "--num-beams", "2"]) == 0


def test_caption_verb_output(tmp_path, capsys):
    model = captioner(_vocab())
    model.save(tmp_path / "m")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"), "--json", "--sample",
                 "--seed", "1", "--num-return-sequences", "3", "--max-new-tokens", "4", "--prompt", "a red"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["captions"]) == 3 and all(c.startswith("a red") for c in row["captions"])
    assert main(["caption", str(tmp_path / "a.png"), "--model", "fmnist-tiny"]) == 2
    assert "no caption decoder" in capsys.readouterr().err


def test_train_captioner_verb_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(1)
    images, labels = two_class_images(rng, 64)
    write_shards([Sample(key=f"k{i}", image=im, text=CAPTIONS[y], meta={"class": ["red", "blue"][y]})
                  for i, (im, y) in enumerate(zip(images, labels))], tmp_path / "shards", samples_per_shard=16)
    torch.manual_seed(0)
    clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).save(tmp_path / "clip")
    args = ["train-captioner", "--init", str(tmp_path / "clip"), "--train-data", str(tmp_path / "shards"),
            "--out", str(tmp_path / "run"), "--steps", "30", "--batch-size", "16", "--lr", "0.003",
            "--workers", "0", "--set", 'decoder={"width": 32, "layers": 1, "heads": 2, "context_length": 8}',
            "--set", "warmup_steps=5", "--set", "log_every=5"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    for name in ("config.json", "metrics.jsonl", "curves.png", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    trained = clipper.load(tmp_path / "run" / "model")
    assert trained.decoder is not None and trained.decoder.vocab_size == len(caption_vocabulary(CAPTIONS, 8))
    # the image tower stayed frozen (stage 1)
    before = clipper.load(tmp_path / "clip")
    assert torch.equal(trained.visual.proj, before.visual.proj)
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--task", "captioning",
                 "--data", str(tmp_path / "shards"), "--labels", "red,blue"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"exact_match", "bleu4", "rouge_l", "cider_d", "class_named"} <= set(metrics) and metrics["n"] == 64


def test_caption_metrics_and_class_naming():
    refs = ["woman cook: medium skin tone", "red apple", "ankle boot"]
    perfect = caption_metrics(refs, refs)
    assert perfect["exact_match"] == 100 and perfect["bleu4"] == pytest.approx(100, abs=1e-3)
    assert perfect["rouge_l"] == pytest.approx(100)
    partial = caption_metrics(["woman cook", "green apple", "ankle boot"], refs)
    assert partial["exact_match"] == pytest.approx(100 / 3) and partial["cider_d"] < perfect["cider_d"]
    classes = ["t-shirt", "trousers", "shirt", "ankle boot"]
    assert named_class("a photo of a t-shirt.", classes) == 0
    assert named_class("a shirt, an item of clothing", classes) == 2
    assert named_class("a photo of a sandal", classes) is None


def test_captioner_resume_equals_a_straight_run(tmp_path):
    from clipper.train_config import TrainConfig
    from clipper.train import Trainer

    rng = np.random.default_rng(2)
    images, labels = two_class_images(rng, 48)
    write_shards([Sample(key=f"k{i}", image=im, text=CAPTIONS[y]) for i, (im, y) in enumerate(zip(images, labels))],
                 tmp_path / "shards", samples_per_shard=12)
    torch.manual_seed(0)
    clipper.CLIP(clipper.ModelConfig.from_dict(RGB_TINY)).save(tmp_path / "clip")
    cfg = dict(objective="caption", init=str(tmp_path / "clip"), train_data=str(tmp_path / "shards"), batch_size=8,
               steps=6, workers=0, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=3, lock_image=False,
               decoder=DecoderConfig(width=32, layers=1, heads=2, context_length=8))
    Trainer(TrainConfig(**cfg), tmp_path / "straight").fit()
    Trainer(TrainConfig(**cfg, stop_after=3), tmp_path / "resumed").fit()
    Trainer(TrainConfig(**cfg), tmp_path / "resumed", resume=True).fit()
    a = clipper.load(tmp_path / "straight" / "model").state_dict()
    b = clipper.load(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = "visual.transformer.blocks.0.mlp.fc.weight"
    assert not torch.equal(a[name], clipper.load(tmp_path / "clip").state_dict()[name])  # lock_image=False trains it
