"""LoRA adapters (through peft) on a language model's linear layers: a llava decoder's stage 2 can
tune them in place of the language model's weights (`TrainConfig.language_lora`: their rank, alpha
twice that, LLaVA's ratio). They are merged into those weights when the trained model is saved, so
a saved model is a plain one for clipper and for the transformers export."""

from __future__ import annotations

import importlib.util

from torch import nn

from ...errors import ConfigError

HEADS = ("head", "lm_head")  # the output layer (tied to the embedding in small models) keeps its weights


def add_lora(module: nn.Module, rank: int) -> None:
    """Rank-`rank` adapters on every linear layer of `module` but its head; only they train."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("train.language_lora: LoRA needs peft (pip install 'clipper[vlm]')")
    import peft

    targets = [name for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in HEADS]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora(module: nn.Module) -> None:
    """Each adapter of `module` (`add_lora`'s) added into its layer's weight, the plain layer put back."""
    from peft.tuners.lora import LoraLayer

    for name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.get_base_layer())
