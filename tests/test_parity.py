"""clipper's towers give open_clip's embeddings on the same weights."""

import open_clip
import pytest
import torch

from clipper import preset
from clipper.interop.open_clip import from_open_clip_state_dict, to_open_clip_state_dict

from conftest import small_config, small_open_clip

TEXTS = ["a photo of a cat.", "", "itap of a ankle boot.", "Ünïcödé — naïve café 😀🐈 日本語のテキスト",
         " ".join(f"word{i}" for i in range(120)),  # longer than the context: truncated
         "a", "a photo of the large trousers, an item of clothing!!!"]


def _check_same(oc, ours, image_size: int, tol: float = 1e-5):
    images = torch.randn(3, 3, image_size, image_size)
    tokens = open_clip.tokenize(TEXTS, context_length=oc.context_length)
    with torch.no_grad():
        diff_img = (oc.encode_image(images, normalize=True) - ours.encode_image(images, normalize=True)).abs().max()
        diff_txt = (oc.encode_text(tokens, normalize=True) - ours.encode_text(tokens, normalize=True)).abs().max()
    assert diff_img <= tol, f"image embeddings differ by {diff_img}"
    assert diff_txt <= tol, f"text embeddings differ by {diff_txt}"


# ViT-B-16 is in the slow sweep (and benchmarks/zoo.py --parity): the same code as B-32 at 4x the tokens
@pytest.mark.parametrize("name", ["ViT-B-32", pytest.param("ViT-B-16", marks=pytest.mark.slow), "ViT-S-32"])
def test_open_clip_architectures_match(open_clip_models, name):
    oc = open_clip_models(name)
    ours = from_open_clip_state_dict(oc.state_dict(), preset(name)).eval()
    _check_same(oc, ours, 224)


@pytest.mark.parametrize("pool_type,quick_gelu", [("tok", True), ("avg", False)])
def test_small_variants_match(pool_type, quick_gelu):
    oc = small_open_clip(pool_type=pool_type, quick_gelu=quick_gelu)
    ours = from_open_clip_state_dict(oc.state_dict(), small_config(pool_type, quick_gelu)).eval()
    _check_same(oc, ours, 32)


def test_quick_gelu_matters():
    """Loading QuickGELU weights without QuickGELU must give different outputs (the flag is used)."""
    oc = small_open_clip(quick_gelu=True)
    wrong = from_open_clip_state_dict(oc.state_dict(), small_config("tok", False)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (oc.encode_image(images) - wrong.encode_image(images)).abs().max() > 1e-4


def test_round_trip_into_open_clip_strict():
    oc = small_open_clip(init_logit_bias=-10.0)
    ours = from_open_clip_state_dict(oc.state_dict(), small_config("tok", False))
    assert float(ours.logit_bias.detach()) == -10.0
    with torch.no_grad():
        for p in ours.parameters():  # change the weights so the round trip proves something
            p.add_(0.01 * torch.randn_like(p))
    fresh = small_open_clip(init_logit_bias=-10.0)
    fresh.load_state_dict(to_open_clip_state_dict(ours), strict=True)
    _check_same(fresh, ours.eval(), 32)


def test_inferred_config_matches_named(open_clip_models):
    from clipper.interop.open_clip import config_from_open_clip_state_dict

    for name in ["ViT-B-32", "ViT-S-32"]:
        inferred = config_from_open_clip_state_dict(open_clip_models(name).state_dict())
        assert inferred.to_dict() == preset(name).to_dict()


def test_forward_returns_features_and_clamped_scale():
    ours = from_open_clip_state_dict(small_open_clip().state_dict(), small_config("tok", False))
    with torch.no_grad():
        ours.logit_scale.fill_(10.0)  # exp(10) > 100
    out = ours(torch.randn(2, 3, 32, 32), open_clip.tokenize(["a", "b"], context_length=20))
    assert out["image_features"].shape == (2, 48) and out["text_features"].shape == (2, 48)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))
    assert float(out["logit_scale"].detach()) == 100.0
    assert out["logit_bias"] is None
    out["logit_scale"].backward()  # the clamp is inside the graph


def test_bad_inputs_are_named():
    ours = from_open_clip_state_dict(small_open_clip().state_dict(), small_config("tok", False))
    with pytest.raises(ValueError, match="images: expected"):
        ours.encode_image(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="exceeds context_length"):
        ours.encode_text(torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        ours.encode_text(torch.zeros(2, 5))


def test_gradients_match_open_clip():
    """Same loss, same gradients for every parameter: the pooled-row shortcut is exact in training too."""
    oc = small_open_clip().train()
    ours = from_open_clip_state_dict(oc.state_dict(), small_config("tok", False)).train()
    images = torch.randn(6, 3, 32, 32)
    tokens = open_clip.tokenize(TEXTS[:4] + TEXTS[:2], context_length=20)  # duplicates share one encoding

    def loss_of(img, txt, scale):
        logits = scale.exp() * img @ txt.T
        labels = torch.arange(6)
        return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))

    loss_oc = loss_of(oc.encode_image(images, normalize=True), oc.encode_text(tokens, normalize=True), oc.logit_scale)
    loss_ours = loss_of(ours.encode_image(images, normalize=True), ours.encode_text(tokens, normalize=True),
                        ours.logit_scale)
    loss_oc.backward()
    loss_ours.backward()
    assert abs(loss_oc.item() - loss_ours.item()) < 1e-5
    oc_grads = {k: p.grad for k, p in oc.named_parameters()}
    from clipper.interop.open_clip import open_clip_name
    for name, p in ours.named_parameters():
        g = oc_grads[open_clip_name(name)]
        assert torch.allclose(p.grad, g.reshape(p.grad.shape), atol=1e-5), name


def test_converted_model_owns_its_weights():
    oc = small_open_clip()
    ours = from_open_clip_state_dict(oc.state_dict(), small_config())
    before = ours.visual.proj.detach().clone()
    with torch.no_grad():
        oc.visual.proj.add_(1.0)
    assert torch.equal(ours.visual.proj.detach(), before)


def test_mean_pooled_text_sees_only_its_own_tokens():
    """text.pool = "mean": bidirectional over start .. end-of-text, padding masked out, so a text
    encodes alike alone and beside a longer one, and equals a plain unmasked pass over its tokens."""
    import clipper

    config = small_config()
    config.text.pool = "mean"
    torch.manual_seed(0)
    model = clipper.CLIP(config).eval()
    tok = clipper.Tokenizer(config.text.context_length)
    short, long = tok(["a cat"]), tok(["a very long caption about a small grey cat on a mat"])
    with torch.no_grad():
        alone = model.encode_text(short, normalize=False)
        batch = model.encode_text(torch.cat([short, long]), normalize=False)
        torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
        text = model.text
        n = int(short.argmax()) + 1
        x = text.token_embedding(short[:, :n]) + text.positional_embedding[:n]
        manual = text.ln_final(text.transformer(x).mean(1)) @ text.proj
        torch.testing.assert_close(alone, manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be exported"):
        to_open_clip_state_dict(model)
    bad = small_config()
    bad.text.pool = "max"
    with pytest.raises(clipper.config.ConfigError, match="text.pool"):
        bad.validate()
