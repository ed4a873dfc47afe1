"""A training run's config, complete: its layers merged (`clipper.train_config`) and checked
against the registries that name what can be trained and evaluated (the objectives, the
evaluation tasks), which build on the config and so cannot be read from it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError
from .evaluate import EVAL_TASKS
from .objectives import OBJECTIVES
from .train_config import TrainConfig, merge_train_layers


def check_train_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, its fields checked, its objective and evaluation task known, and the objective's own
    rules kept (ConfigError naming the field otherwise)."""
    cfg.validate()
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective: {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.eval_task != "none" and cfg.eval_task not in EVAL_TASKS:
        raise ConfigError(f"train.eval_task: {cfg.eval_task!r} is not one of none, {', '.join(EVAL_TASKS)}")
    OBJECTIVES[cfg.objective].validate(cfg)
    return cfg


def merge_train_config(preset_name: str | None = None, file: str | os.PathLike | None = None,
                       overrides: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> TrainConfig:
    """A run's settings, each layer over the one before (see `merge_train_layers`), checked."""
    return check_train_config(merge_train_layers(preset_name, file, overrides, sets))
