"""The llava decoder kind (issue #36): a pretrained language model behind a projector on a clipper
image tower, trained by the caption objective's trainer. Stage 1 changes the projector alone and
lowers the loss; a resumed run is bit-identical to a straight one; stage 2 tunes the language model;
rows label the answer and its end only; the saved model generates what the trained one did (its
cache equal to recomputing), and its transformers LLaVA export generates the same greedy tokens
in transformers and in clipper."""

import dataclasses
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import clipper  # noqa: E402
from clipper.config import DecoderConfig  # noqa: E402
from clipper.data.samples import Sample  # noqa: E402
from clipper.data.shards import write_shards  # noqa: E402
from clipper.errors import ClipperError  # noqa: E402
from clipper.generate import GenerationConfig, generate  # noqa: E402
from clipper.model.decoders.llava import ANSWER, PAD, PROMPT  # noqa: E402
from clipper.train import Trainer  # noqa: E402
from clipper.train_config import TrainConfig  # noqa: E402
from clipper.vlm import as_vlm  # noqa: E402
from test_vlm_llava import _tokenizer  # noqa: E402

# a chat template over string contents, as language models' own are
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}"
            "ASSISTANT: {{ m['content'] }}</s> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "yellow": (220, 220, 30)}
THINGS = ["cat", "dog", "tree", "car"]
PROMPT_TEXT = "describe the photo"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny random Llama folder (tied embeddings, word-level tokenizer, chat template), a tiny
    3-channel contrastive model (its init folder) and shards of coloured squares named by colour."""
    root = tmp_path_factory.mktemp("llava-decoder")
    tokenizer, vocab = _tokenizer()
    tokenizer.chat_template = TEMPLATE
    config = transformers.LlamaConfig(vocab_size=vocab + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                                      initializer_range=0.3)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    torch.manual_seed(0)
    model = clipper.CLIP(clipper.ModelConfig.from_dict(
        {"embed_dim": 32, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 12, "width": 32, "layers": 2, "heads": 2}}))
    model.save(root / "clip")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(64):
        colour, thing = list(COLOURS)[i % 4], THINGS[(i // 4) % 4]
        image = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 15, (16, 16, 3)), 0, 255).astype(np.uint8)
        samples.append(Sample(key=f"s{i:04d}", image=image, text=f"{colour} {thing}"))
    write_shards(samples, root / "shards", samples_per_shard=32)
    return root


def _cfg(root, **kw):
    base = dict(objective="caption", init=str(root / "clip"), train_data=str(root / "shards"), lock_image=True,
                decoder=DecoderConfig(kind="llava", language_model=str(root / "lm"), context_length=40,
                                      prompt=PROMPT_TEXT),
                batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=2, steps=12, workers=0, log_every=1,
                checkpoint_every=6, seed=3, shuffle_buffer=20, eval_task="none")
    base.update(kw)
    return TrainConfig(**base)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def stage1(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    trainer = Trainer(_cfg(parts), out)
    trainer.fit()
    return trainer, out


def test_stage1_trains_the_projector_alone_and_lowers_the_loss(parts, stage1):
    trainer, out = stage1
    init = clipper.load(parts / "clip")
    fresh = clipper.load(parts / "clip")
    fresh.add_decoder(trainer.model.config.decoder)  # the language model as its folder holds it
    trained = trainer.model.state_dict()
    for key, value in {**init.state_dict(), **{"decoder." + k: v for k, v in fresh.decoder.state_dict().items()
                                                if not k.startswith("projector.")}}.items():
        assert torch.equal(trained[key], value), key
    assert not torch.equal(trained["decoder.projector.linear_1.weight"], fresh.decoder.projector.linear_1.weight)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_a_resumed_run_is_bit_identical(parts, stage1, tmp_path):
    straight, _ = stage1
    Trainer(_cfg(parts, stop_after=6), tmp_path / "b").fit()
    resumed = Trainer(_cfg(parts), tmp_path / "b", resume=True)
    assert resumed.step == 6
    resumed.fit()
    a, b = _state(straight.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_tower_features_train_as_recomputed_ones(parts, tmp_path):
    """Each image's two fixed views (augment.views): a run keeping the frozen tower's features on
    disk trains as one computing them every step (to float rounding: a view is computed within
    another batch, whose size moves the matmuls' last bits); it computes each view once, a second run
    finds them all on disk, and a resumed run (its memory empty) trains as the straight one."""
    from clipper.train_config import AugmentConfig

    views = AugmentConfig(crop_scale=(0.5, 1.0), views=2)
    computed = Trainer(_cfg(parts, augment=views, steps=16), tmp_path / "a")
    computed.fit()
    cache = str(tmp_path / "features")
    cached = Trainer(_cfg(parts, augment=views, steps=16, feature_cache=cache), tmp_path / "b")
    first = cached.fit()["tower_features"]
    a, b = _state(computed.model), _state(cached.model)
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    files = list((tmp_path / "features").glob("*/*/*.safetensors"))
    assert first["found"] > 0 and len(files) == first["computed"] <= 2 * 64  # at most two views an image
    again = Trainer(_cfg(parts, augment=views, steps=16, feature_cache=cache), tmp_path / "c")
    assert again.fit()["tower_features"] == {"found": 16 * 8, "computed": 0}
    Trainer(_cfg(parts, augment=views, steps=16, feature_cache="memory", stop_after=8), tmp_path / "d").fit()
    resumed = Trainer(_cfg(parts, augment=views, steps=16, feature_cache="memory"), tmp_path / "d", resume=True)
    resumed.fit()
    c = _state(resumed.model)
    assert all((a[k] - c[k]).abs().max() < 1e-5 for k in a)


def test_stage2_tunes_the_language_model_from_the_stage1_model(parts, stage1, tmp_path):
    _, out = stage1
    trainer = Trainer(_cfg(parts, init=str(out / "model"), train_language_model=True, lr=1e-3, steps=4,
                           language_lr_scale=0.5), tmp_path / "s2")
    before = _state(trainer.model)
    names = {g["name"]: g["lr_scale"] for g in trainer.optimizer.param_groups}
    assert names["language"] == 0.5 and not any(n.startswith(("visual", "text")) for n in names)
    trainer.fit()
    after = trainer.model.state_dict()
    assert not torch.equal(after["decoder.language.blocks.0.qkv.weight"], before["decoder.language.blocks.0.qkv.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("visual.", "text.")))


def test_stage2_lora_trains_adapters_alone_and_saves_them_merged(parts, stage1, tmp_path):
    """language_lora: peft's adapters on the language model's linear layers train, its weights stay;
    an unfinished run checkpoints the adapters and resumes; the finished model holds them merged
    (the same loss as with the adapters) and loads as a plain llava model."""
    pytest.importorskip("peft")
    _, out = stage1
    cfg = _cfg(parts, init=str(out / "model"), train_language_model=True, language_lora=4, lr=1e-2, steps=8)
    trainer = Trainer(dataclasses.replace(cfg, stop_after=6), tmp_path / "lora")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("decoder.projector.") for n in trainable)
    before = _state(trainer.model)
    trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lora_" not in k and "projector" not in k)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if "lora_B" in k)
    resumed = Trainer(cfg, tmp_path / "lora", resume=True)
    assert resumed.step == 6 and any("lora_" in k for k in resumed.model.state_dict())
    model = resumed.model
    decoder = model.decoder
    rows = decoder.training_tokenizer()(["red cat", "blue dog"])
    images = torch.rand(2, 3, 16, 16)

    def loss(m):
        with torch.no_grad():
            return m.decoder.loss(m.decoder.image_tokens(m.visual, images), rows)["loss"]

    resumed.fit()  # (its last two steps, then the adapters merged into the weights it saves)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    saved = clipper.load(tmp_path / "lora" / "model")
    assert torch.allclose(loss(saved), loss(model))
    stage1_lm = clipper.load(out / "model").decoder.language.state_dict()
    assert not torch.equal(saved.decoder.language.state_dict()["blocks.0.qkv.weight"], stage1_lm["blocks.0.qkv.weight"])
    with pytest.raises(ClipperError, match="language_lora"):
        Trainer(_cfg(parts, init=str(out / "model"), language_lora=4), tmp_path / "no")


def test_rows_label_the_answer_and_its_end_only(parts, stage1):
    decoder = stage1[0].model.decoder
    rows = decoder.training_tokenizer()(["red cat", "a big blue dog"])
    assert rows.shape == (2, 2, 40)
    tokenizer = decoder.tokenizer
    for row, answer in zip(rows, ["red cat", "a big blue dog"]):
        ids, role = row[0], row[1]
        assert tokenizer.decode(ids[role == ANSWER]) == answer + " </s>"  # word-level: spaced
        assert (ids[role == PROMPT] == decoder.image_token_id).sum() == 16  # the 4x4 grid, class token dropped
        assert set(role[(role == PAD).nonzero()[0, 0]:].tolist()) == {PAD}  # right padding only
    assert decoder.target_counts(rows).tolist() == [3, 5]


def test_retrieved_captions_give_way_so_the_answer_keeps_its_end(stage1):
    from clipper.model.decoders.llava import ChatRows

    decoder = stage1[0].model.decoder
    near = {"red cat": ["blue dog", "green tree car"]}

    def row(length):
        out = ChatRows(decoder.processor, PROMPT_TEXT, decoder.image_text, length, near)(["red cat"])[0]
        return decoder.tokenizer.decode(out[0][out[1] != PAD])

    alone = len(decoder.processor.answer_row(PROMPT_TEXT, "red cat", [decoder.image_text])[0])
    assert "green" in row(80) and "blue" in row(80)
    one = row(alone + 5)  # room for the nearest caption alone
    assert "blue" in one and "green" not in one and one.endswith("red cat </s>")
    assert "blue" not in row(alone) and row(alone).endswith("red cat </s>")
    assert not row(alone - 1).endswith("</s>")  # no caption left to drop: cut


def test_the_saved_model_generates_what_the_trained_one_did(stage1):
    trainer, out = stage1
    loaded = clipper.load(out / "model")
    assert (out / "model" / "language_model" / "tokenizer.json").is_file()
    assert loaded.decoder.language.head.weight is loaded.decoder.language.embed.weight  # tied again
    pixels = torch.rand(3, 3, 16, 16)
    trained = trainer.model.eval()
    options = GenerationConfig(max_new_tokens=6)
    assert generate(loaded, pixels, None, options) == generate(trained, pixels, None, options)
    assert generate(loaded, pixels, ["describe the photo", "what is this", "describe the image"], options)
    decoder = loaded.decoder
    with torch.no_grad():
        tokens = decoder.image_tokens(loaded.visual, pixels[:1])
        row = torch.tensor([decoder.codec.prompt("")])
        valid = torch.ones_like(row, dtype=torch.bool)
        cached, cache = decoder.prefill(tokens, row, valid, 4)
        step = decoder.decode(cached.argmax(-1), cache)
        full = decoder.full_logits(tokens, torch.cat([row, cached.argmax(-1)[:, None]], 1),
                                   torch.ones(1, row.shape[1] + 1, dtype=torch.bool))
    assert torch.allclose(cached, decoder.full_logits(tokens, row, valid), atol=1e-5)
    assert torch.allclose(step, full, atol=1e-5)


def test_the_transformers_export_generates_the_same_tokens(stage1, tmp_path):
    from clipper.cli import main

    _, out = stage1
    main(["convert", "--model", str(out / "model"), "--to", "hf", "--out", str(tmp_path / "hf")])
    model = clipper.load(out / "model")
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(1)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": PROMPT_TEXT}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == model.decoder.codec.prompt(PROMPT_TEXT)  # the same chat, rendered
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        got = generate(model, inputs["pixel_values"], [PROMPT_TEXT], GenerationConfig(max_new_tokens=6))[0][0]
    expected = expected.tolist()
    assert got == model.decoder.processor.decode(expected[:expected.index(2)] if 2 in expected else expected)
    # clipper runs the export as a VLM too, with the same answer
    assert clipper.load(tmp_path / "hf").chat(image, PROMPT_TEXT, max_new_tokens=6) == got
    # and chats with the model itself (its own preprocessing), a second turn on the kept cache
    talk = as_vlm(model).conversation(image)
    own = generate(model, model.preprocessing(image)[None], [PROMPT_TEXT], GenerationConfig(max_new_tokens=6))[0][0]
    assert talk.ask(PROMPT_TEXT, max_new_tokens=6)["text"] == own
    talk.ask("what is it", max_new_tokens=4)
    assert talk.reused > 0


def test_bad_settings_are_refused(parts):
    with pytest.raises(ClipperError, match="joint objective"):
        Trainer(_cfg(parts, contrastive_weight=1.0), "/nonexistent/never-written")
    model = clipper.load(parts / "clip")
    with pytest.raises(ClipperError, match="feature_layer"):
        model.add_decoder(DecoderConfig(kind="llava", language_model=str(parts / "lm"), feature_layer=5))
    with pytest.raises(ClipperError, match="context_length"):
        model.add_decoder(DecoderConfig(kind="llava", language_model=str(parts / "lm"), context_length=16))
    with pytest.raises(ClipperError, match="projects every token by an MLP"):
        from clipper.vlm.build import write_llava_of

        model.add_decoder(DecoderConfig(kind="llava", language_model=str(parts / "lm"), projector="linear",
                                        context_length=40))
        write_llava_of(model, parts / "never")


def test_retrieval_prompts_never_hold_the_samples_own_caption(parts, tmp_path):
    from clipper.model.decoders.datastore import Datastore, retrieval_prompt

    cfg = _cfg(parts, steps=2, decoder=DecoderConfig(kind="llava", language_model=str(parts / "lm"), context_length=64,
                                                     prompt=PROMPT_TEXT, retrieve=2))
    trainer = Trainer(cfg, tmp_path / "r")
    decoder = trainer.model.decoder
    captions = {f"{c} {t}" for c in COLOURS for t in THINGS}
    assert set(decoder.datastore.captions) == captions and set(decoder.neighbours) == captions
    for caption, near in decoder.neighbours.items():
        assert len(near) == 2 and caption not in near and set(near) <= captions
    rows = decoder.training_tokenizer()(["red cat"])
    asked = retrieval_prompt(PROMPT_TEXT, decoder.neighbours["red cat"])
    assert asked.startswith("Similar images: ") and all(n in asked for n in decoder.neighbours["red cat"])
    ids = decoder.processor.answer_row(asked, "red cat", [decoder.image_text])[0]
    assert rows[0, 0, :len(ids)].tolist() == ids
    trainer.fit()
    loaded = clipper.load(tmp_path / "r" / "model")  # its datastore travels in the model's folder
    assert loaded.decoder.datastore.captions == decoder.datastore.captions
    pixels = torch.rand(2, 3, 16, 16)
    codec = loaded.captioner().codec
    with torch.no_grad():
        rows = loaded.decoder.prompt_rows(loaded, pixels, ["", ""], codec)
        # another datastore, swapped in without retraining: other captions in the prompt
        loaded.decoder.datastore = Datastore(["small house", "big sky"],
                                             clipper.embed.embed_texts(loaded, ["small house", "big sky"],
                                                                       to_numpy=False))
        swapped = loaded.decoder.prompt_rows(loaded, pixels, ["", ""], codec)
    assert all("small" in loaded.decoder.tokenizer.decode(r).split() for r in swapped) and swapped != rows
    assert generate(loaded, pixels, None, GenerationConfig(max_new_tokens=3))
    # its chats retrieve as its captions do: the same prompt, the same greedy answer
    from PIL import Image

    image = Image.new("RGB", (16, 16), (200, 30, 30))
    vlm = as_vlm(loaded)
    talk = vlm.conversation(image)
    answer = talk.ask(PROMPT_TEXT, max_new_tokens=4)["text"]
    asked = talk.messages[0]["content"][-1]["text"]
    assert asked.startswith("Similar images: ") and "small house" in asked and asked.endswith(PROMPT_TEXT)
    assert answer == loaded.caption([image], max_new_tokens=4)[0]
    served = vlm.retrieving([{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                             {"role": "user", "content": [{"type": "image"}]}], [image])
    assert served[0]["content"][0]["text"] == "be brief" and "big sky" in served[1]["content"][-1]["text"]
    # the verbs: a datastore from shards, used in place of the model's own

    from clipper.cli import main

    assert main(["datastore", "--model", str(tmp_path / "r" / "model"), "--data", str(parts / "shards"),
          "--out", str(tmp_path / "ds")]) == 0
    assert Datastore.load(tmp_path / "ds").captions == decoder.datastore.captions
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["caption", str(tmp_path / "red.png"), "--model", str(tmp_path / "r" / "model"), "--datastore",
                 str(tmp_path / "ds"), "--max-new-tokens", "3"]) == 0
    assert main(["chat", str(tmp_path / "red.png"), PROMPT_TEXT, "--model", str(tmp_path / "r" / "model"),
                 "--datastore", str(tmp_path / "ds"), "--max-new-tokens", "3"]) == 0
    assert main(["caption", str(tmp_path / "red.png"), "--model", str(parts / "clip"), "--datastore",
                 str(tmp_path / "ds")]) == 2  # a model that does not retrieve: a one-line error


def test_a_damaged_datastore_is_refused_naming_the_file(tmp_path):
    from clipper.model.decoders.datastore import Datastore

    Datastore(["a", "b"], torch.eye(2)).save(tmp_path / "ok")
    assert Datastore.load(tmp_path / "ok").nearest(torch.tensor([[0.0, 1.0]]), 1) == [["b"]]
    (tmp_path / "ok" / "captions.json").write_text('["a"]')
    with pytest.raises(ClipperError, match="vectors.safetensors"):
        Datastore.load(tmp_path / "ok")
    (tmp_path / "ok" / "captions.json").write_text('{"a": 1}')
    with pytest.raises(ClipperError, match="captions.json"):
        Datastore.load(tmp_path / "ok")


def test_instruction_turns_train_in_place_of_captions(parts, stage1, tmp_path):
    """LLaVA-form data (`clipper data llava`, images kept inside their folder) and the pipeline's
    `instructions` share: rows answer the conversation's questions, the caption's prompt otherwise."""
    from PIL import Image

    from clipper.cli import main
    from clipper.data.pipeline import ShardDataset
    from clipper.data.reader import read_tar, list_shards

    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img" / "red.png")
    (tmp_path / "secret.png").write_bytes((tmp_path / "img" / "red.png").read_bytes())
    good = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this"},
                                                  {"from": "gpt", "value": "a red car"},
                                                  {"from": "human", "value": "what colour is it"},
                                                  {"from": "gpt", "value": "red"}]}
    lines = [json.dumps(good), json.dumps({**good, "image": "../secret.png"}), "{not json",
             json.dumps({"image": "red.png", "conversations": [{"from": "gpt", "value": "x"}]}),
             json.dumps({"conversations": good["conversations"]})]
    (tmp_path / "img" / "chat.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "llava", str(tmp_path / "img" / "chat.jsonl"), "--out", str(tmp_path / "shards")]) == 0
    samples = [s for shard in list_shards(str(tmp_path / "shards")) for s in read_tar(shard)]
    assert len(samples) == 1 and samples[0]["txt"].decode() == "a red car"
    rejected = (tmp_path / "shards" / "rejected.jsonl").read_text()
    assert "outside the images' folder" in rejected and "not LLaVA's human/gpt turns" in rejected
    assert "no image path" in rejected and rejected.count("\n") == 4

    decoder = stage1[0].model.decoder
    seen = {}
    for share in (0.0, 1.0):
        data = ShardDataset(str(tmp_path / "shards"), stage1[0].model.config, 1, train=True, rank=0, world=1,
                            tokenizer=decoder.training_tokenizer(), instructions=share)
        answers = set()
        for _ in range(12):
            data.set_epoch(_)
            row = next(iter(data))["text"][0]
            answers.add(decoder.tokenizer.decode(row[0][row[1] == ANSWER]))
        seen[share] = answers
    assert seen[0.0] == {"a red car </s>"} and seen[1.0] == {"a red car </s>", "red </s>"}
    with pytest.raises(ClipperError, match="instructions"):
        Trainer(_cfg(parts, objective="contrastive", instructions=0.5), tmp_path / "never")


def test_emoji_instruction_answers_come_from_the_metadata():
    from clipper.data.instructions import PHRASINGS, emoji_conversations, question_answers

    meta = {"cp": "x", "name": "woman police officer: medium-dark skin tone", "keywords": ["cop", "officer"],
            "group": "People & Body", "subgroup": "person-role"}
    turns = dict((q, a) for q, a in question_answers(emoji_conversations(meta)))
    asked = {kind: next(a for q, a in turns.items() if q in PHRASINGS[kind]) for kind in
             ("name", "keywords", "group", "subgroup", "skin tone", "gender")}
    assert asked == {"name": meta["name"], "keywords": "cop, officer", "group": "People & Body",
                     "subgroup": "person-role", "skin tone": "medium-dark skin tone", "gender": "a woman"}
    flag = dict(question_answers(emoji_conversations({"cp": "y", "name": "flag: Egypt"})))
    assert "Egypt" in flag.values() and len(flag) == 2
    assert emoji_conversations(meta) == emoji_conversations(dict(meta))  # phrasings seeded by the emoji
    assert question_answers([{"from": "human", "value": "q"}] * 100) == []  # bounded


def test_pixel_shuffle_quarters_the_image_tokens(parts):
    from clipper.vlm.build import write_llava_of

    model = clipper.load(parts / "clip")
    model.add_decoder(DecoderConfig(kind="llava", language_model=str(parts / "lm"), context_length=40, shuffle=2,
                                    prompt=PROMPT_TEXT))
    decoder = model.decoder
    rows = decoder.training_tokenizer()(["red cat"])
    assert (rows[0, 0] == decoder.image_token_id).sum() == 4  # the 4x4 grid in 2x2 blocks
    assert decoder.projector.linear_1.in_features == 4 * 32
    pixels = torch.rand(2, 3, 16, 16)
    rows = decoder.training_tokenizer()(["red cat", "blue dog"])
    out = decoder.loss(decoder.image_tokens(model.visual, pixels), rows)
    out["loss"].backward()
    assert decoder.projector.linear_1.weight.grad is not None
    from PIL import Image

    image = Image.new("RGB", (16, 16), (30, 30, 200))
    model.eval()
    own = generate(model, model.preprocessing(image)[None], [PROMPT_TEXT], GenerationConfig(max_new_tokens=5))[0][0]
    assert as_vlm(model).chat(image, PROMPT_TEXT, max_new_tokens=5) == own
    with pytest.raises(ClipperError, match="pixel shuffle"):
        write_llava_of(model, parts / "never")
    with pytest.raises(ClipperError, match="shuffle 3"):
        clipper.load(parts / "clip").add_decoder(DecoderConfig(kind="llava", language_model=str(parts / "lm"),
                                                                context_length=40, shuffle=3))


def test_the_shared_prompt_start_runs_once_with_the_same_loss_and_gradient(stage1):
    """Stage 1 runs the template's common first tokens once for the batch: the loss and the
    projector's gradient equal the whole rows' (the tiny template shares its 'USER:' alone)."""
    decoder = stage1[0].model.decoder
    rows = decoder.training_tokenizer()(["red cat", "a big blue dog", "green tree"])
    pixels = torch.rand(3, 3, 16, 16)
    tokens = decoder.image_tokens(stage1[0].model.visual, pixels)
    ids, role = rows[:, 0], rows[:, 1]
    labels = ids.masked_fill(role != ANSWER, -100)
    predicting = torch.zeros_like(role, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    assert decoder._shared_start(ids, predicting) == 2  # <s> USER:
    results = []
    for shared in (True, False):
        decoder.projector.zero_grad()
        if not shared:
            decoder._shared_start = lambda ids, predicting: 0
        loss = decoder.answer_loss(tokens, ids, labels, role != PAD)
        loss.backward()
        results.append((loss.detach(), decoder.projector.linear_1.weight.grad.clone()))
    del decoder._shared_start
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert (results[0][1] - results[1][1]).abs().max() < 1e-5 * results[1][1].abs().max()


def test_the_trained_model_serves_chat_completions(stage1):
    """`clipper serve --chat`: the model's VLM behind /v1/chat/completions answers what it chats."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import urllib.request

    from PIL import Image

    from clipper.serve.chat import ChatService
    from clipper.serve.config import Limits
    from clipper.serve.testing import serve_in_thread

    _, out = stage1
    vlm = as_vlm(clipper.load(out / "model"))
    image = Image.new("RGB", (16, 16), (30, 160, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url, stop = serve_in_thread(ChatService(vlm, "emoji-vlm", Limits(max_new_tokens=6)))
    try:
        data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                          {"type": "text", "text": PROMPT_TEXT}]}], "max_tokens": 6}
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
    finally:
        stop()
    assert answer == vlm.chat(image, PROMPT_TEXT, max_new_tokens=6)
