"""Idefics3 (SmolVLM) and SmolVLM2 folders (issue #34): tiny random models transformers writes here
run in clipper exactly: the processor's ids and pixels (tiles, the global image, their row/column
tags; 1 and 2 images; with and without splitting), the logits, greedy and beam tokens of
`generate`, the cache against recompute, a second chat turn without the image again. The
Idefics3 tower's grid (25) is one whose position ids transformers does not number 0..n-1."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLM's processor needs it

import clipper  # noqa: E402
from clipper.errors import ClipperError  # noqa: E402
from clipper.generate import GenerationConfig, generate_ids  # noqa: E402
from clipper.vlm import VLM  # noqa: E402
from clipper.vlm.idefics3 import grid_positions  # noqa: E402
from test_vlm_llava import _image, _tokenizer  # noqa: E402

SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
            *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
            "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# kind -> (vision image size, patch, scale factor, the processor's longest edge, tied embeddings)
VARIANTS = {"idefics3": (100, 4, 5, 300, False), "smolvlm": (32, 4, 2, 96, True)}


def _write(folder, kind: str, splitting: bool = True, seed: int = 0):
    size, patch, scale, longest, tied = VARIANTS[kind]
    tokenizer, vocab = _tokenizer(SPECIALS)
    end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=size,
                  patch_size=patch)
    text = transformers.LlamaConfig(vocab_size=vocab + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    bos_token_id=1, eos_token_id=end, pad_token_id=0, tie_word_embeddings=tied)
    images = dict(size={"longest_edge": longest}, max_image_size={"longest_edge": size}, do_image_splitting=splitting)
    tokens = (size // patch) ** 2 // scale ** 2
    if kind == "idefics3":
        config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                                             image_token_id=image_token, tie_word_embeddings=tied)
        model_class = transformers.Idefics3ForConditionalGeneration
        processor = transformers.Idefics3Processor(transformers.Idefics3ImageProcessor(**images), tokenizer,
                                                   image_seq_len=tokens, chat_template=TEMPLATE)
    else:
        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale,
                                            image_token_id=image_token, tie_word_embeddings=tied)
        model_class = transformers.SmolVLMForConditionalGeneration
        processor = transformers.SmolVLMProcessor(transformers.SmolVLMImageProcessor(**images), tokenizer,
                                                  transformers.SmolVLMVideoProcessor(), image_seq_len=tokens,
                                                  chat_template=TEMPLATE)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # random init leaves norms and biases at exactly 1 or 0: spread them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[end, 2], pad_token_id=0).save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return (path, *_write(path, request.param))


def _messages(prompt: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}]


def _theirs(processor, prompt: str, images):
    text = processor.apply_chat_template(_messages(prompt, len(images)), add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt")


SIZES = ((45, 37), (20, 64), (33, 33), (250, 90))  # (h, w): portrait, landscape, square, tall (3 x 2 tiles)


def test_grid_positions_follow_transformers_bucketing():
    assert torch.equal(grid_positions(32), torch.arange(32 * 32))
    assert not torch.equal(grid_positions(25), torch.arange(25 * 25))


def test_processor_ids_and_pixels_equal_transformers(folder, tmp_path):
    path, _, processor = folder
    vlm = clipper.load(path)
    assert isinstance(vlm, VLM) and vlm.config.kind == json.loads((path / "config.json").read_text())["model_type"]
    for images in [[_image(i, size)] for i, size in enumerate(SIZES)] + [[_image(5, (30, 70)), _image(6, (64, 40))]]:
        theirs = _theirs(processor, "describe this image", images)
        ours = vlm.processor.encode(vlm.processor.render(_messages("describe this image", len(images))),
                                    vlm.processor.image_texts(images))
        assert ours == theirs["input_ids"][0].tolist()
        pixels = vlm.processor.pixels(images)
        expected = theirs["pixel_values"].flatten(0, 1)
        expected = expected[expected.flatten(1).abs().sum(1) > 0]  # transformers pads an image's frames with zeros
        assert torch.equal(pixels, expected), [im.size for im in images]
    tiles = vlm.processor.image_texts([_image(3, SIZES[3])])[0]
    assert "<row_3_col_2>" in tiles and "<row_3_col_3>" not in tiles  # 3 rows of 2 tiles, then the global image


def test_without_splitting_one_frame_equals_transformers(tmp_path):
    _, processor = _write(tmp_path, "smolvlm", splitting=False)
    vlm = clipper.load(tmp_path)
    images = [_image(3, SIZES[3])]
    theirs = _theirs(processor, "a cat", images)
    assert vlm.processor.pixels(images).shape[0] == 1
    assert torch.equal(vlm.processor.pixels(images), theirs["pixel_values"][0])
    assert vlm.processor.encode(vlm.processor.render(_messages("a cat")),
                                vlm.processor.image_texts(images)) == theirs["input_ids"][0].tolist()


def test_logits_equal_transformers_and_cache_equals_recompute(folder):
    path, reference, processor = folder
    vlm = clipper.load(path)
    for images in ([_image(0, SIZES[3])], [_image(1), _image(2, SIZES[1])]):
        inputs = _theirs(processor, "what is in the picture", images)
        with torch.no_grad():
            theirs = reference(**inputs).logits[:, -1]
            features = vlm.image_features(vlm.processor.pixels(images)).reshape(1, -1, vlm.language.config.hidden_size)
            tokens, valid = inputs["input_ids"], inputs["attention_mask"].bool()
            ours, cache = vlm.prefill(features, tokens, valid, 8)
            assert (ours - theirs).abs().max() < 1e-4
            assert (vlm.full_logits(features, tokens, valid) - ours).abs().max() < 1e-5
            for token in (5, 9):
                step = torch.tensor([token])
                cached = vlm.decode(step, cache)
                tokens, valid = torch.cat([tokens, step[:, None]], 1), torch.cat([valid, valid.new_ones(1, 1)], 1)
                theirs = reference(input_ids=tokens, pixel_values=inputs["pixel_values"],
                                   pixel_attention_mask=inputs["pixel_attention_mask"]).logits[:, -1]
                assert (cached - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("options", [{"num_beams": 1}, {"num_beams": 3}])
def test_generate_equals_transformers(folder, options):
    path, reference, processor = folder
    vlm = clipper.load(path)
    ends = vlm.config.end_ids
    images = [_image(0, SIZES[0]), _image(3, SIZES[3])]  # a batch of two: one frame against four
    ours = vlm.generate(images, ["describe the photo"] * 2, GenerationConfig(max_new_tokens=8, **options))
    for image, got in zip(images, ours):
        inputs = _theirs(processor, "describe the photo", [image])
        with torch.no_grad():
            theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False, **options)
        theirs = theirs[0, inputs["input_ids"].shape[1]:].tolist()
        cut = [i for i, t in enumerate(theirs) if t in ends]
        assert got[0] == theirs[:cut[0] if cut else None], options


def test_second_turn_reuses_the_image_and_the_cache(folder):
    path, _, _ = folder
    vlm = clipper.load(path)
    talk = vlm.conversation(_image(3, SIZES[3]))
    talk.ask("describe the photo", max_new_tokens=5)
    calls = []
    tower = vlm.vision.hidden_states
    vlm.vision.hidden_states = lambda *a: calls.append(1) or tower(*a)
    second = talk.ask("what is red", max_new_tokens=4)
    assert not calls and talk.reused > 4 * 25
    rendered = vlm.processor.render(talk.messages[:-1])
    with torch.inference_mode():
        again = generate_ids(vlm, talk.features.reshape(1, -1, talk.features.shape[-1]),
                             [vlm.processor.encode(rendered, talk.image_texts)], GenerationConfig(max_new_tokens=4))
    assert second["tokens"] == again[0][0]


def test_bad_folders_fail_in_one_line(tmp_path):
    _write(tmp_path, "smolvlm")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_factor": 3}))
    with pytest.raises(ClipperError, match="scale_factor 3"):
        clipper.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_token_id": 7}))
    with pytest.raises(ClipperError, match="image token"):
        clipper.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    settings = json.loads((tmp_path / "processor_config.json").read_text())
    settings["image_processor"]["max_image_size"] = {"longest_edge": 64}
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ClipperError, match="tiles are 64 px"):
        clipper.load(tmp_path)
