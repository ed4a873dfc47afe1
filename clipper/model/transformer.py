"""Pre-norm transformer blocks: one forward for every use (full sequences, causal or masked,
a KV cache to fill, one pooled row), and the decode step of generation as the one fast path.

q, k and v come from one packed projection (the layout of open_clip's in_proj, so weights map
one to one). Attention: `attend`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, bound_layer, bound_linear, linear


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# On CPU, the fused SDPA kernel loses to two batched matmuls and a softmax for short key
# sequences (fp32, 2 threads, forward + backward: 7.8 vs 2.4 ms at 256 x 4 heads x 17 tokens,
# 28 vs 18 ms at 64 x 12 x 50; in bf16 30 vs 3 ms) and wins from about 77 keys on. One query
# (the pooled row of a tower's last block) is the exception: SDPA 0.86 vs 4.8 ms forward +
# backward at 256 x 4 heads x 17 keys (forward alone: 0.17 vs 0.10).
SHORT_KEYS = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal) for a boolean
    `mask` (True = attend) or none; the causal mask is aligned top-left, as SDPA's."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    # an exported graph (ONNX) serves every length: one op, not a choice made at export time
    if torch.compiler.is_exporting() or q.device.type != "cpu" or Lk > SHORT_KEYS or Lq == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # softmax in fp32 under bf16 autocast
    if causal:
        scores = scores.masked_fill(_upper(Lq, Lk, q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


@functools.lru_cache(maxsize=64)
def _upper(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a mask made under inference mode could not be saved for backward
        return torch.ones(rows, cols, dtype=torch.bool, device=device).triu(1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, int] | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x [B, L, C] -> [B, L, C].

        causal: each token sees itself and those before it (top-left aligned, as SDPA's is_causal).
        mask: boolean [B, 1, L, S] or [B, 1, 1, S], True = attend.
        kv: (cache [2, B, H, S, C/H], start): x's keys and values are written into the cache at
            start .. start + L and the queries attend to everything cached up to there (prefill).
        at: [B] positions: only that row of each sample queries, over the keys of all of x, and the
            result is [B, 1, C] (a tower's pooled row: exact, and the other rows' work is skipped).
        """
        B, L, C = x.shape
        H = self.heads
        if at is not None:
            q, k, v = self._project_at(x, at)
            if causal:  # the row at position i sees keys 0..i, as under the full causal mask
                mask, causal = (torch.arange(L, device=x.device) <= at[:, None]).view(B, 1, 1, L), False
            elif mask is not None and mask.shape[-2] > 1:  # a mask per query: the pooled row's
                mask = mask[torch.arange(B, device=x.device), :, at].unsqueeze(2)
        else:
            qkv = self.qkv(x).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if kv is not None:
                cache, start = kv
                cache[:, :, :, start:start + L] = qkv[1:]  # keys and values in one copy
                k, v = cache[:, :, :, :start + L].unbind(0)
        y = attend(q, k, v, mask, causal)
        return self.out(y.transpose(1, 2).reshape(B, -1, C))

    def context_kv(self, context: torch.Tensor) -> torch.Tensor:
        """Keys and values of another sequence [B, N, C] for cross-attention: [2, B, H, N, C/H]
        (the k and v rows of the packed projection; computed once per image in generation)."""
        B, N, C = context.shape
        H = self.heads
        if isinstance(self.qkv, nn.Linear):
            kv = linear(context, self.qkv.weight[C:], self.qkv.bias[C:])
        else:  # int8: not sliceable
            kv = self.qkv(context)[..., C:]
        return kv.reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)

    def cross(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Cross-attention of x [R, L, C] over `context_kv`'s keys and values [2, B, H, N, C/H],
        where R is a multiple of B: rows r*B/R .. of x belong to context row r (beams and samples
        of one image share its keys, which are not copied)."""
        R, L, C = x.shape
        H, B = self.heads, kv.shape[1]
        w, b = (self.qkv.weight[:C], self.qkv.bias[:C]) if isinstance(self.qkv, nn.Linear) else (None, None)
        q = linear(x, w, b) if w is not None else self.qkv(x)[..., :C]
        # the rows of one context row become extra queries of it: [B, H, (R/B) * L, C/H]
        q = q.view(B, R // B, L, H, C // H).permute(0, 3, 1, 2, 4).reshape(B, H, (R // B) * L, C // H)
        y = attend(q, kv[0], kv[1])
        y = y.view(B, H, R // B, L, C // H).permute(0, 2, 3, 1, 4).reshape(R, L, C)
        return self.out(y)

    def _project_at(self, x: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q of the rows `at` [B, H, 1, C/H], k and v of all rows [B, H, L, C/H]."""
        B, L, C = x.shape
        H = self.heads
        query = x[torch.arange(B, device=x.device), at].unsqueeze(1)
        if isinstance(self.qkv, nn.Linear):
            w, b = self.qkv.weight, self.qkv.bias
            q = linear(query, w[:C], b[:C]).view(B, 1, H, C // H).transpose(1, 2)
            k, v = linear(x, w[C:], b[C:]).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # a packed projection that cannot be sliced (int8): project all, keep the query rows' q
            q = self.qkv(query)[..., :C].reshape(B, 1, H, C // H).transpose(1, 2)
            k, v = self.qkv(x).view(B, L, 3, H, C // H)[:, :, 1:].permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v


def activation(name: str) -> nn.Module:
    """A tower's `act` (config.ACTIVATIONS): GELU, its tanh form (SigLIP2's), or OpenAI's QuickGELU."""
    return {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU}[name]()


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc = Linear(width, hidden)
        self.act = activation(act)
        self.proj = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, int] | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C] ([B, 1, C] with `at`); the arguments are Attention.forward's."""
        h = self.ln_1(x)
        if at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), at].unsqueeze(1)
        x = x + self.attn(h, causal, mask, kv, at)
        return x + self.mlp(self.ln_2(x))


class CrossBlock(Block):
    """A pre-norm block whose attention reads another sequence (CoCa's decoder: text queries over
    the image's caption tokens), normalised by its own LayerNorm (ln_1_kv)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu"):
        super().__init__(width, heads, mlp_ratio, act)
        self.ln_1_kv = nn.LayerNorm(width)

    def context(self, context: torch.Tensor) -> torch.Tensor:
        """The keys and values this block attends to, [2, B, H, N, C/H], from context [B, N, C]."""
        return self.attn.context_kv(self.ln_1_kv(context))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x [R, L, C] over the keys and values of `context` (R a multiple of their rows)."""
        x = x + self.attn.cross(self.ln_1(x), kv)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None,
                pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """All outputs [B, L, C]; with `pool_index` [B], only the output at that position [B, C]
        (the last block computes that row alone). `mask` [B, 1, 1, L]: which keys every query may
        see (True = attend)."""
        last = len(self.blocks) - 1 if pool_index is not None else len(self.blocks)
        for block in self.blocks[:last]:
            x = block(x, causal, mask)
        if pool_index is not None:
            x = self.blocks[last](x, causal, mask, at=pool_index).squeeze(1)
        return x


@torch.no_grad()
def init_blocks(blocks: nn.ModuleList) -> None:
    """open_clip's init of a stack of blocks: depth-scaled residual outputs."""
    width = blocks[0].ln_1.normalized_shape[0]
    out_std = width ** -0.5 * (2 * len(blocks)) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
        nn.init.zeros_(block.attn.qkv.bias)
        nn.init.normal_(block.attn.out.weight, std=out_std)
        nn.init.zeros_(block.attn.out.bias)
        nn.init.normal_(block.mlp.fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.proj.weight, std=out_std)


# --- the fast path: one decode step ---------------------------------------------------------------

DecodeStep = Callable[..., torch.Tensor]  # step(x, kv, n, mask): see bind_decode_step


def bind_decode_step(block: Block) -> DecodeStep:
    """`block`'s forward for one new token per row, bound to its current weights: the only code
    path besides Block.forward, kept because it is the hot loop of generation (tested equal to it).

    step(x, kv, n, mask) takes x [B, C], writes its key and value into the cache kv [2, B, H, S,
    C/H] at position n, attends to positions 0..n (no causal mask needed: one query) where `mask`
    [B, 1, 1, n + 1] allows, and returns the block's output [B, C].

    Why a separate path: a step is ~30 ops of a few us each on 8 rows, so it keeps rows 2-D, looks
    no module attribute up (~80 lookups per token otherwise: ~420 -> ~345 us per token at 3 layers
    x 128, 8 rows), calls its linears bound once (`bound_linear`: addmm on transposes taken once, or
    oneDNN on weights reordered once) and adds residuals in place (another ~6%; benchmarks/README.md,
    "Caption decoding"). Int8 layers (quantize_int8) keep their own forward.
    """
    g1, b1, e1 = block.ln_1.weight, block.ln_1.bias, block.ln_1.eps
    H = block.attn.heads
    qkv, finish = bound_layer(block.attn.qkv), _bind_finish(block)

    def step(x: torch.Tensor, kv: torch.Tensor, n: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, C = x.shape
        h = qkv(torch.layer_norm(x, (C,), g1, b1, e1)).view(B, 3, H, 1, C // H)
        kv.narrow(3, n, 1).copy_(h[:, 1:].transpose(0, 1))
        kv = kv.narrow(3, 0, n + 1)
        return finish(x, F.scaled_dot_product_attention(h[:, 0], kv[0], kv[1], attn_mask=mask).view(B, C))

    return step


CrossStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # step(x, kv): see bind_cross_step


def bind_cross_step(block: CrossBlock) -> CrossStep:
    """`block`'s forward for one new token per row, bound as bind_decode_step's (tested equal to
    CrossBlock.forward): step(x, kv) takes x [R, C] and the keys and values of the context
    [2, B, H, N, C/H] (`CrossBlock.context`; rows r * R/B .. of x belong to context row r, as in
    `Attention.cross`) and returns the block's output [R, C]."""
    g1, b1, e1 = block.ln_1.weight, block.ln_1.bias, block.ln_1.eps
    H, qkv = block.attn.heads, block.attn.qkv
    C = qkv.in_features
    q = bound_linear(qkv.weight, qkv.bias, rows=(0, C)) if isinstance(qkv, nn.Linear) else \
        (lambda x: qkv(x)[:, :C])  # int8: not sliceable
    finish = _bind_finish(block)

    def step(x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        R, B = x.shape[0], kv.shape[1]
        h = q(torch.layer_norm(x, (C,), g1, b1, e1)).view(B, R // B, H, C // H).transpose(1, 2)
        return finish(x, attend(h, kv[0], kv[1]).transpose(1, 2).reshape(R, C))

    return step


def _bind_finish(block: Block) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a bound step does after attention: finish(x, y) = the block's output [B, C] from its
    input x and attention output y (heads merged), the residuals added in place on fresh outputs."""
    g2, b2, e2 = block.ln_2.weight, block.ln_2.bias, block.ln_2.eps
    out, fc, proj = (bound_layer(m) for m in (block.attn.out, block.mlp.fc, block.mlp.proj))
    act = block.mlp.act.forward

    def finish(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = out(y).add_(x)
        return proj(act(fc(torch.layer_norm(x, x.shape[1:], g2, b2, e2)))).add_(x)

    return finish
