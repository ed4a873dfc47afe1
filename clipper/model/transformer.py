"""Pre-norm transformer blocks.

q, k and v come from one packed projection (the layout of open_clip's in_proj, so weights map
one to one). Attention: `attend`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, bound_linear, linear


def _bound(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer as a function of its 2-D input, its weights looked up once (int8 layers: as is)."""
    return bound_linear(layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer.forward


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
    if q.device.type != "cpu" or Lk > SHORT_KEYS or Lq == 1:
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

    def forward(self, x: torch.Tensor, causal: bool = False, query: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over `x` [B, L, C]; with `query` [B, Q, C] only those rows attend (to the
        keys of all of `x`, limited by the boolean `mask` [B, 1, Q, L] where given)."""
        B, L, C = x.shape
        H = self.heads
        if query is None:
            q, k, v = self.qkv(x).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        elif isinstance(self.qkv, nn.Linear):
            w, b = self.qkv.weight, self.qkv.bias
            q = linear(query, w[:C], b[:C]).view(B, -1, H, C // H).transpose(1, 2)
            k, v = linear(x, w[C:], b[C:]).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # a packed projection that cannot be sliced (int8): project all, keep the query rows' q
            q = self.qkv(query)[..., :C].reshape(B, -1, H, C // H).transpose(1, 2)
            k, v = self.qkv(x).view(B, L, 3, H, C // H)[:, :, 1:].permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(q, k, v, mask, causal and query is None)
        return self.out(y.transpose(1, 2).reshape(B, -1, C))


    def forward_cached(self, x: torch.Tensor, mask: torch.Tensor | None,
                       kv: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        """Self-attention of new tokens x [B, T, C] over a KV cache (keys and values [2, B, H, S,
        C/H], filled up to `start`) plus themselves; their keys and values are written into the
        cache. `mask` [B, 1, T, start + T] (True = attend); None: causal among the new tokens."""
        B, T, C = x.shape
        H = self.heads
        qkv = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if kv is not None:
            cache, start = kv
            cache[:, :, :, start:start + T] = qkv[1:]  # keys and values in one copy
            k, v = cache[:, :, :, :start + T].unbind(0)
        y = attend(q, k, v, mask, mask is None and T > 1)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.fc = Linear(width, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.proj = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), quick_gelu)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, mask: torch.Tensor | None,
                       kv: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), mask, kv)
        return x + self.mlp(self.ln_2(x))

    def stepper(self) -> Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor]:
        """The block's decode step, bound to its current weights: step(x, kv, n, mask) takes one
        new token per row, x [B, C], attends to the cache kv [2, B, H, S, C/H] filled up to n and to
        itself (no causal mask needed), and writes its key and value at n. A step is ~30 ops of a
        few us each on 8 rows, so it keeps rows 2-D and looks no module attribute up (~80 lookups
        per token otherwise): ~420 -> ~345 us per token, 3 layers x 128, 8 rows; addmm on bound
        transposes and in-place residual adds took another ~6% (benchmarks/README.md)."""
        (g1, b1, e1), (g2, b2, e2) = ((ln.weight, ln.bias, ln.eps) for ln in (self.ln_1, self.ln_2))
        H = self.attn.heads
        qkv, out, fc, proj = (_bound(m) for m in (self.attn.qkv, self.attn.out, self.mlp.fc, self.mlp.proj))
        act = self.mlp.act.forward

        def step(x: torch.Tensor, kv: torch.Tensor, n: int, mask: torch.Tensor | None) -> torch.Tensor:
            B, C = x.shape
            h = qkv(torch.layer_norm(x, (C,), g1, b1, e1)).view(B, 3, H, 1, C // H)
            kv.narrow(3, n, 1).copy_(h[:, 1:].transpose(0, 1))
            kv = kv.narrow(3, 0, n + 1)
            y = F.scaled_dot_product_attention(h[:, 0], kv[0], kv[1], attn_mask=mask)
            x = out(y.view(B, C)).add_(x)  # in place on the fresh output: one allocation less
            return proj(act(fc(torch.layer_norm(x, (C,), g2, b2, e2)))).add_(x)

        return step

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The block's output at one position per sample (`index` [B]), as [B, C].

        Keys and values still come from every token, but the query, the output projection and
        the MLP run on one row per sample instead of all of them: exact, and cheaper.
        """
        B, L, _ = x.shape
        rows = torch.arange(B, device=x.device)
        h = self.ln_1(x)
        mask = None
        if causal:  # the row at position i sees keys 0..i, as under the full causal mask
            mask = (torch.arange(L, device=x.device) <= index[:, None]).view(B, 1, 1, L)
        y = x[rows, index] + self.attn(h, query=h[rows, index].unsqueeze(1), mask=mask).squeeze(1)
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """All outputs [B, L, C]; with `pool_index` [B], only the output at that position [B, C].
        `mask` [B, 1, 1, L]: which keys every query may see (True = attend)."""
        last = len(self.blocks) - 1 if pool_index is not None else len(self.blocks)
        for block in self.blocks[:last]:
            x = block(x, causal=causal, mask=mask)
        if pool_index is not None:
            x = self.blocks[last].forward_at(x, pool_index, causal=causal)
        return x
