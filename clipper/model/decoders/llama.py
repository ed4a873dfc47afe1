"""clipper's own Llama-family language model (Llama, SmolLM2, Qwen2 with q/k/v bias) for inference:
transformers' weights, fused q/k/v and gate/up projections, and a KV cache allocated once and
written in place. transformers' module concatenates its cache at every step (a copy of the whole
cache per layer) and spends a step's time in many small calls; this one is what a decode step
costs on top of reading the weights (benchmarks/README.md, "Vision-language models"). Logits
equal transformers' to float rounding; the model types and settings it does not cover run in
transformers' module (language.LanguageModel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from ...errors import CheckpointError
from .base import attention_mask

_GQA = TorchVersion(torch.__version__) >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...)


def native_supported(config) -> bool:
    """Whether `config` (a transformers text config) is a model this module runs exactly: Llama or
    Qwen2 with SiLU, plain rotary positions and full attention."""
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "other"
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type", "default") != "default":
        rope_type = params["rope_type"]
    return (config.model_type in ("llama", "qwen2") and getattr(config, "hidden_act", "silu") == "silu"
            and rope_type == "default" and not getattr(config, "use_sliding_window", False)
            and not getattr(config, "mlp_bias", False) and float(getattr(config, "partial_rotary_factor", 1.0)) == 1.0)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class KVCache:
    """Keys and values of every layer [layers, B, kv_heads, capacity, head_dim], filled to `length`,
    grown (copied once) when a call needs more room. `crop` and `batch_select_indices` as
    transformers' caches, for the engine's beams and a chat's kept cache."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, capacity: int, dtype, device):
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def reserve(self, n: int) -> None:
        if n > self.k.shape[3]:
            shape = (*self.k.shape[:3], max(n, 2 * self.k.shape[3]), self.k.shape[4])
            k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
            k[:, :, :, :self.length], v[:, :, :, :self.length] = self.k[:, :, :, :self.length], \
                self.v[:, :, :, :self.length]
            self.k, self.v = k, v

    def crop(self, n: int) -> None:
        """Keep the first n positions (negative: drop -n from the end)."""
        self.length = self.length + n if n < 0 else min(n, self.length)

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def _drop_head(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "head.weight", None)


def _head_from_embedding(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "head.weight" not in state_dict and prefix + "embed.weight" in state_dict:
        state_dict[prefix + "head.weight"] = state_dict[prefix + "embed.weight"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the input's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, hidden: int, qkv_bias: bool,
                 o_bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.ln_1 = nn.Parameter(torch.ones(width))
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(heads * head_dim, width, bias=o_bias)
        self.ln_2 = nn.Parameter(torch.ones(width))
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)


class LlamaLM(nn.Module):
    """Embeddings -> logits through the cache; the interface of language.LanguageModel."""
    takes_prefix = True  # forward(..., prefix=): a shared prompt start run once (training)

    def __init__(self, config):
        super().__init__()
        self.config = config
        width, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or width // heads)
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        self.eps = float(config.rms_norm_eps)
        self.embed = nn.Embedding(int(config.vocab_size), width)
        self.blocks = nn.ModuleList(Block(width, heads, kv_heads, head_dim, int(config.intermediate_size), qkv_bias,
                                          o_bias) for _ in range(int(config.num_hidden_layers)))
        self.norm = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, int(config.vocab_size), bias=False)
        # on the CPU even where the module is built on the meta device (the weights come later)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (_rope_theta(config) ** exponents), persistent=False)
        if getattr(config, "tie_word_embeddings", False):
            self.tie()
            # a tied head is the embedding: saved once (safetensors refuses shared tensors), tied again at load
            self._register_state_dict_hook(_drop_head)  # the public name arrived after torch 2.4
            self.register_load_state_dict_pre_hook(_head_from_embedding)
            self.register_load_state_dict_post_hook(lambda module, keys: module.tie())

    def tie(self) -> None:
        self.head.weight = self.embed.weight

    def load_weights(self, sd: dict[str, torch.Tensor], source: str, tied: bool = False) -> None:
        """transformers' `*ForCausalLM` names (model.*, lm_head.weight), fused as this module holds them."""
        tied = tied or bool(getattr(self.config, "tie_word_embeddings", False))
        sd = dict(sd)

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise CheckpointError(f"{source}: the language model lacks {name}")
            return sd.pop(name)

        own = {"embed.weight": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
        for i, block in enumerate(self.blocks):
            p = f"model.layers.{i}."
            own[f"blocks.{i}.ln_1"] = take(p + "input_layernorm.weight")
            own[f"blocks.{i}.ln_2"] = take(p + "post_attention_layernorm.weight")
            own[f"blocks.{i}.qkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if block.qkv.bias is not None:
                own[f"blocks.{i}.qkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            own[f"blocks.{i}.out.weight"] = take(p + "self_attn.o_proj.weight")
            if block.out.bias is not None:
                own[f"blocks.{i}.out.bias"] = take(p + "self_attn.o_proj.bias")
            own[f"blocks.{i}.gate_up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"),
                                                           take(p + "mlp.up_proj.weight")])
            own[f"blocks.{i}.down.weight"] = take(p + "mlp.down_proj.weight")
        head = sd.pop("lm_head.weight", None)
        if head is None and not tied:
            raise CheckpointError(f"{source}: the language model lacks lm_head.weight (and its embeddings are not tied)")
        if sd:
            raise CheckpointError(f"{source}: the language model's weights do not fit its config ({len(sd)} "
                                  f"unexpected, e.g. {sorted(sd)[:2]})")
        expected = self.state_dict()
        for key, value in own.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(f"{source}: {key} has shape {list(value.shape)}, the config wants "
                                      f"{list(expected[key].shape)}")
        if tied:
            self.tie()  # a folder may tie where its text config does not say so
        else:
            own["head.weight"] = head
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in own.items()}, strict=not tied, assign=True)
        if tied:
            self.tie()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' `*ForCausalLM` names (the fused projections split again)."""
        out = {"model.embed_tokens.weight": self.embed.weight, "model.norm.weight": self.norm,
               "lm_head.weight": self.head.weight}
        for i, block in enumerate(self.blocks):
            p, h = f"model.layers.{i}.", block.head_dim
            out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"] = block.ln_1, block.ln_2
            sizes = [block.heads * h, block.kv_heads * h, block.kv_heads * h]
            for name, part in zip("qkv", block.qkv.weight.split(sizes)):
                out[p + f"self_attn.{name}_proj.weight"] = part
            if block.qkv.bias is not None:
                for name, part in zip("qkv", block.qkv.bias.split(sizes)):
                    out[p + f"self_attn.{name}_proj.bias"] = part
            out[p + "self_attn.o_proj.weight"] = block.out.weight
            if block.out.bias is not None:
                out[p + "self_attn.o_proj.bias"] = block.out.bias
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = block.gate_up.weight.chunk(2)
            out[p + "mlp.down_proj.weight"] = block.down.weight
        return {k: v.detach() for k, v in out.items()}

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        block = self.blocks[0]
        return KVCache(len(self.blocks), batch, block.kv_heads, block.head_dim, capacity, self.embed.weight.dtype,
                       self.embed.weight.device)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                last_only: bool | torch.Tensor = True, prefix: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T or 1, V] of `embeds` [B, T, D]; `mask` [B, cached + T] marks real tokens,
        `positions` [B, T] their position ids; `cache` grows by T (none: nothing is kept, as in
        training and the recompute reference). `last_only` a [B, T] mask: the logits [N, V] of
        those positions alone (training's predicting positions). `prefix` (no `cache`): one row's
        cache that every row continues, read and never written (training's shared prompt start)."""
        B, T, _ = embeds.shape
        start = cache.length if cache is not None else prefix.length if prefix is not None else 0
        end = start + T
        if cache is not None:
            cache.reserve(end)
        freqs = positions.float()[..., None] * self.inv_freq.float()  # transformers' float32 angles
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos().to(embeds.dtype)[:, None], angles.sin().to(embeds.dtype)[:, None]
        valid = mask[:, :end].bool()
        if T == 1 and bool(valid.all()):
            allowed = None  # one new token sees every cached one
        else:  # causal over the cache, left padding masked
            allowed = attention_mask(valid, start=start)
        x = embeds
        for i, block in enumerate(self.blocks):
            h, kd, hq = block.head_dim, block.kv_heads, block.heads
            q, k, v = block.qkv(rms_norm(x, block.ln_1, self.eps)).split([hq * h, kd * h, kd * h], dim=-1)
            q = _rotate(q.view(B, T, hq, h).transpose(1, 2), cos, sin)
            keys, values = _rotate(k.view(B, T, kd, h).transpose(1, 2), cos, sin), v.view(B, T, kd, h).transpose(1, 2)
            if cache is not None:  # written in place; attention reads everything cached so far
                cache.k[i, :, :, start:end], cache.v[i, :, :, start:end] = keys, values
                keys, values = cache.k[i, :, :, :end], cache.v[i, :, :, :end]
            elif prefix is not None:  # new tensors (autograd keeps these): the prefix's, then the rows'
                keys = torch.cat([prefix.k[i, :, :, :start].expand(B, -1, -1, -1), keys], dim=2)
                values = torch.cat([prefix.v[i, :, :, :start].expand(B, -1, -1, -1), values], dim=2)
            if _GQA:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, enable_gqa=hq != kd)
            else:
                rep = hq // kd
                o = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1),
                                                   attn_mask=allowed)
            x = x + block.out(o.transpose(1, 2).reshape(B, T, hq * h))
            gate, up = block.gate_up(rms_norm(x, block.ln_2, self.eps)).chunk(2, dim=-1)
            x = x + block.down(F.silu(gate) * up)
        if cache is not None:
            cache.length = end
        if isinstance(last_only, torch.Tensor):
            x = x[last_only]
        elif last_only:
            x = x[:, -1:]
        return self.head(rms_norm(x, self.norm, self.eps))
