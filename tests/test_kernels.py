"""The hand-picked CPU paths equal the reference ops they replace: short-sequence attention vs
SDPA, oneDNN / few-row / bf16-autocast linear vs F.linear, and the linear under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from clipper.model import linear as linear_module
from clipper.model.linear import bound_linear, linear
from clipper.model.transformer import SHORT_KEYS, attend


def _qkv(b, h, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, requires_grad=True) for n in (lq, lk, lk)]


@pytest.mark.parametrize("lq,lk,causal,masked", [(17, 17, False, False), (16, 16, True, False), (1, 40, False, True),
                                                 (5, 23, False, True), (SHORT_KEYS + 13,) * 2 + (True, False)])
def test_attention_equals_sdpa_with_gradients(lq, lk, causal, masked):
    q, k, v = _qkv(3, 2, lq, lk, 8)
    mask = None
    if masked:  # padding: every row keeps at least one key
        mask = torch.rand(3, 1, lq, lk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True
    grad = torch.randn(3, 2, lq, 8)
    ours = attend(q, k, v, mask, causal)
    (ours * grad).sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    (ref * grad).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, t in zip(ours_grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)


HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.fixture(params=[True, False], ids=["onednn", "blas"])
def kernel(request, monkeypatch):
    """Both linear kernels, whichever this CPU picks by default (oneDNN on AMD, MKL on Intel)."""
    if request.param and not HAS_ONEDNN:
        pytest.skip("oneDNN linear not in this torch build")
    monkeypatch.setattr(linear_module, "ONEDNN", request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_linear_equals_f_linear_forward_and_backward(rows, kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 48, generator=g, requires_grad=True)
    w = torch.randn(96, 48, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True)
    grad = torch.randn(rows, 96, generator=g)
    (linear(x, w, b) * grad).sum().backward()
    ours = [t.grad.clone() for t in (x, w, b)]
    out = linear(x, w, b)
    for t in (x, w, b):
        t.grad = None
    ref = F.linear(x, w, b)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    for a, t in zip(ours, (x, w, b)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows,out,bias", [(8, 96, True), (8, 96, False), (40, 96, True), (8, 2000, True)])
def test_bound_linear_equals_linear_and_sees_weights_loaded_in_place(rows, out, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 48, generator=g)
    w = torch.randn(out, 48, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    f = bound_linear(w, b)
    torch.testing.assert_close(f(x), linear(x, w, b), atol=1e-5, rtol=1e-5)
    w.copy_(torch.randn(out, 48, generator=g))  # a checkpoint loaded into the same tensors
    torch.testing.assert_close(f(x), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


HAS_REORDER = HAS_ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@pytest.fixture
def packing(monkeypatch):
    """bound_linear's reordered oneDNN weights, on any CPU (by default only where oneDNN is chosen)."""
    if not HAS_REORDER:
        pytest.skip("oneDNN weight reordering not in this torch build")
    monkeypatch.setattr(linear_module, "PACK", True)


@pytest.mark.parametrize("rows,transposed,bias", [(None, False, True), ((384, 768), False, True), (None, True, False)])
def test_packed_bound_linear_equals_f_linear_and_follows_the_weight(packing, rows, transposed, bias):
    import gc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 384, generator=g)
    w = torch.randn(*((384, 1152) if transposed else (1152, 384)), generator=g)
    b = torch.randn(1152, generator=g) if bias else None

    def reference(w: torch.Tensor) -> torch.Tensor:
        ref_w = w.t() if transposed else w
        cut = slice(*rows) if rows else slice(None)
        return F.linear(x, ref_w[cut], None if b is None else b[cut])

    f = bound_linear(w, b, rows, transposed)
    assert id(w) in linear_module._PACKED  # reordered: this shape is above the packing threshold
    torch.testing.assert_close(f(x), reference(w), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bound_linear(w, b, rows, transposed)(x[:3]), reference(w)[:3], atol=1e-4, rtol=1e-5)
    w.mul_(-0.5)  # loaded or trained in place: a new binding reorders the new values
    torch.testing.assert_close(bound_linear(w, b, rows, transposed)(x), reference(w), atol=1e-4, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bound_linear(w, b, rows, transposed)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(w), atol=0.5, rtol=0.02)
    key = id(w)
    del w, f
    gc.collect()
    assert key not in linear_module._PACKED  # the packed copies go with their weight


def test_linear_under_cpu_bf16_autocast(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b)
        ref = F.linear(x, w, b)  # autocast's own bf16 linear
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32  # master weights stay fp32
    torch.testing.assert_close(b.grad, torch.full((16,), 64.0))


@pytest.mark.skipif(not HAS_ONEDNN, reason="oneDNN linear not in this torch build")
def test_linear_compiles(monkeypatch):
    monkeypatch.setattr(linear_module, "ONEDNN", True)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    compiled = torch.compile(lambda x: linear(x, w, b), backend="inductor")
    torch.testing.assert_close(compiled(x), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("width", [32, 384])  # 384: its linears are reordered (on any CPU, here)
def test_decode_step_equals_block_forward_with_a_cache(width, monkeypatch):
    """The bound decode step (generation's fast path) computes what Block.forward does for the
    same position, and writes the same keys and values into the cache."""
    from clipper.model.transformer import Block, bind_decode_step

    monkeypatch.setattr(linear_module, "PACK", HAS_REORDER)

    torch.manual_seed(0)
    block = Block(width, 4, 4.0, act="gelu").eval()
    x = torch.randn(3, 6, width)
    step_cache, full_cache = torch.zeros(2, 3, 4, 8, width // 4), torch.zeros(2, 3, 4, 8, width // 4)
    with torch.inference_mode():
        full = block(x, causal=True)
        assert torch.allclose(block(x, causal=True, kv=(full_cache, 0)), full, atol=1e-6)  # a cache changes nothing
        block(x[:, :5], causal=True, kv=(step_cache, 0))  # prefill five positions, then step the sixth
        out = bind_decode_step(block)(x[:, 5].contiguous(), step_cache, 5, None)
    torch.testing.assert_close(out, full[:, 5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_cache[:, :, :, :6], full_cache[:, :, :, :6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width,per_image", [(32, 1), (384, 3)])
def test_cross_step_equals_cross_block_forward(width, per_image, monkeypatch):
    """CoCa's bound cross-attention step equals CrossBlock.forward on one token per row, each
    image's rows (beams) reading its keys and values."""
    from clipper.model.transformer import CrossBlock, bind_cross_step

    monkeypatch.setattr(linear_module, "PACK", HAS_REORDER)

    torch.manual_seed(0)
    block = CrossBlock(width, 4, 4.0).eval()
    context, x = torch.randn(2, 7, width), torch.randn(2 * per_image, width)
    with torch.inference_mode():
        kv = block.context(context)
        out = bind_cross_step(block)(x, kv)
        ref = block(x[:, None], kv)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cpu_inference_runs_in_row_chunks_with_the_same_embeddings(monkeypatch):
    from clipper.presets import preset
    from clipper import chunks
    from clipper.model import CLIP

    torch.manual_seed(0)
    model = CLIP(preset("fmnist-tiny")).eval()
    images = torch.randn(10, 1, 28, 28)
    tokens = model.tokenize([f"a photo of thing {i}" + " and more" * (i % 3) for i in range(10)])
    calls = {"visual": 0, "text": 0}
    for name in calls:
        getattr(model, name).register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        whole = model.visual(images), model.text(tokens)
        row_image = chunks._row_bytes(model.visual, images)
        monkeypatch.setattr(chunks, "ROW_CHUNK_BYTES", 3 * row_image)  # 4 parts of 2-3 images
        calls.update(visual=0, text=0)
        parts = model.encode_image(images), model.encode_text(tokens)
        tokens_whole, tokens_parts = model.visual.tokens(images), chunks.chunked(model.visual, images, "tokens")
    assert calls["visual"] == 4 and calls["text"] >= 2
    assert 10 * chunks._row_bytes(model.visual, images, "tokens") > chunks.ROW_CHUNK_BYTES  # the decoder's: chunked too
    torch.testing.assert_close(tokens_parts, tokens_whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the widest activation is measured on the row that reaches furthest, per reach
    assert row_image == 17 * 4 * 128 * 4  # 4x4 patches and the class token, MLP hidden 512, float32
    assert chunks._row_bytes(model.text, tokens) > chunks._row_bytes(model.text, tokens[:1])
    calls.update(visual=0)
    model.encode_image(images).sum().backward()  # training: one pass, nothing chunked
    assert calls["visual"] == 1
