"""A VLM from a clipper model's image tower and a language model (issue #36): written as a
transformers LLaVA folder that transformers and clipper both run (the same greedy tokens), and
stage 1 of LLaVA's recipe on it: the projector alone trains (tower and language model bit-identical),
the loss falls, the loss covers the answer's tokens only, cached tower features equal recomputed
ones, and the trained projector is written back into the folder; stage 2 tunes the language model
too, and the folder it writes runs the tuned model in clipper and transformers alike."""

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import clipper  # noqa: E402
from clipper.errors import ClipperError  # noqa: E402
from clipper.generate import GenerationConfig  # noqa: E402
from clipper.model.decoders.spliced import IGNORE  # noqa: E402
from clipper.vlm.align import AlignConfig, align, save_trained, tower_store  # noqa: E402
from clipper.vlm.build import write_llava  # noqa: E402
from test_vlm_llava import _inputs, _tokenizer  # noqa: E402

END = 5  # <|im_end|>: after <unk> <s> </s> <image> <|im_start|>
CAPTIONS = ["red cat", "blue dog", "green tree", "yellow car", "small house", "big sky"]


def _lm_folder(path):
    """A tiny random Llama with the word-level tokenizer: the `lm_source` write_llava reads."""
    tokenizer, vocab = _tokenizer(("<|im_start|>", "<|im_end|>"))  # build's ChatML template
    config = transformers.LlamaConfig(vocab_size=vocab + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=END, pad_token_id=0,
                                      initializer_range=0.3)  # logits that can move far from uniform
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _images():
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 220, 30), (120, 80, 40), (100, 160, 230)]
    rng = np.random.default_rng(0)
    return [Image.fromarray((np.array(c, dtype=np.float64) + rng.normal(0, 10, (40, 40, 3))).clip(0, 255)
                            .astype(np.uint8)) for c in colours]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    torch.manual_seed(0)
    tower = clipper.CLIP(clipper.preset("emoji-small")).eval()
    folder = write_llava(root / "vlm", _lm_folder(root / "lm"), tower=tower)
    return tower, folder


def test_a_clipper_tower_llava_runs_alike_in_transformers_and_clipper(composed):
    tower, folder = composed
    vlm = clipper.load(folder)
    image = _images()[0]
    pixels = vlm.processor.pixels([image])
    # the folder's image processor (transformers' torchvision resize) against the model's own (PIL's)
    assert (pixels - tower.preprocessing(image)[None]).abs().max() < 0.05
    with torch.no_grad():  # the tower as the folder holds it
        ours = vlm.vision.hidden_states(pixels, [-1])[0]
        theirs = tower.visual.hidden_states(pixels, [-1])[0]
    assert (ours - theirs).abs().max() < 1e-5
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    inputs = _inputs(processor, "describe the photo", image)
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    expected = expected.tolist()
    got = vlm.generate([image], ["describe the photo"], GenerationConfig(max_new_tokens=8))[0][0]
    assert got == (expected[:expected.index(END)] if END in expected else expected)


def test_a_tower_transformers_has_no_class_for_is_refused(tmp_path):
    config = clipper.preset("emoji-small")
    config.vision.pool = "avg"
    with pytest.raises(ClipperError, match="no class for it"):
        write_llava(tmp_path / "vlm", tmp_path / "lm-unused", tower=clipper.CLIP(config))


def test_training_rows_label_the_answer_only(composed):
    _, folder = composed
    vlm = clipper.load(folder)
    texts = vlm.processor.image_texts(_images()[:1])
    ids, labels = vlm.processor.answer_row("describe the photo", "red cat", texts)
    answer = [t for t in labels if t != IGNORE]
    assert len(ids) == len(labels) and labels[0] == IGNORE
    assert vlm.processor.tokenizer.convert_ids_to_tokens(END) == "<|im_end|>"
    assert vlm.processor.decode(answer).strip() == "red cat" and answer[-1] == END  # the answer, then its end
    assert all(t == IGNORE for t, i in zip(labels, ids) if i == vlm.config.image_token_id)


def test_stage_one_trains_the_projector_alone_and_writes_it_back(composed, tmp_path):
    _, folder = composed
    vlm = clipper.load(folder)
    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if not k.startswith("projector.")}
    projector = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    store = tower_store(vlm, tmp_path / "features")
    images = _images()
    losses = align(vlm, images, CAPTIONS, AlignConfig(steps=40, batch_size=6, lr=3e-2, warmup=3), store)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = vlm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # tower and language model untouched
    assert any(not torch.equal(vlm.projector.state_dict()[k], v) for k, v in projector.items())
    # cached features: on disk, equal to a recompute, and read back by a new store
    assert len(list((tmp_path / "features").glob("*/*/*.safetensors"))) == len(images)
    with torch.no_grad():
        pixels = vlm.processor.pixels(images[:1])
        recomputed = vlm.tower_features(pixels)
    again = tower_store(vlm, tmp_path / "features")
    assert torch.equal(again(pixels, lambda p: 1 / 0), recomputed)  # read back, not computed
    # the trained projector in the folder: clipper and transformers load it
    copy = tmp_path / "trained"
    import shutil

    shutil.copytree(folder, copy)
    save_trained(vlm, copy)
    again = clipper.load(copy)
    assert all(torch.equal(a, b) for a, b in zip(again.projector.state_dict().values(),
                                                  vlm.projector.state_dict().values()))
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(copy).eval()
    assert torch.equal(reference.model.multi_modal_projector.linear_1.weight, vlm.projector.linear_1.weight)


def test_stage_two_tunes_the_language_model_and_the_folder_holds_it(composed, tmp_path):
    import shutil

    _, folder = composed
    vlm = clipper.load(folder)
    tower = {k: v.clone() for k, v in vlm.vision.state_dict().items()}
    language = {k: v.clone() for k, v in vlm.language.hf_state_dict().items()}
    images = _images()
    losses = align(vlm, images, CAPTIONS, AlignConfig(steps=30, batch_size=6, lr=3e-2, warmup=3, train_lm=True,
                                                      lm_lr=3e-3))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert all(torch.equal(vlm.vision.state_dict()[k], v) for k, v in tower.items())
    tuned = vlm.language.hf_state_dict()
    assert any(not torch.equal(tuned[k], v) for k, v in language.items())
    copy = tmp_path / "tuned"
    shutil.copytree(folder, copy)
    save_trained(vlm, copy)
    again = clipper.load(copy)
    image = images[0]
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(copy).eval()
    inputs = _inputs(transformers.AutoProcessor.from_pretrained(copy), "describe the photo", image)
    with torch.no_grad():
        features = vlm.image_features(vlm.processor.pixels([image]))
        row = vlm.processor.encode(vlm.processor.render([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "describe the photo"}]}]), vlm.processor.image_texts([image]))
        tokens = torch.tensor([row])
        valid = torch.ones_like(tokens, dtype=torch.bool)
        ours = vlm.full_logits(features, tokens, valid)
        assert (again.full_logits(again.image_features(again.processor.pixels([image])), tokens, valid) - ours
                ).abs().max() < 1e-4
        assert (reference(**inputs).logits[:, -1] - ours).abs().max() < 1e-4
