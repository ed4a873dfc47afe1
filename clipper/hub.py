"""Files from the Hugging Face hub (tokenizers, model configs): a folder, else the local HF cache,
else, when the hub can be reached, a download; offline, a one-line error that says what to fetch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError, first_line
from .io import reachable

HF_HOST = "huggingface.co"
T = TypeVar("T")


def from_hub(load: Callable[..., T], name: str, field: str, files: str = "", instead: str = "") -> T:
    """`load(**kwargs)` (a transformers `from_pretrained` on `name`): from the folder `name`, the
    local cache (`local_files_only=True`, no network touched) or the hub. `field` names the setting in
    errors; `files`: what `hf download` should fetch ("" for the whole repository); `instead`: the
    other way to give it."""
    if Path(name).is_dir():
        try:
            return load()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field} {name}: not a Hugging Face folder for this ({first_line(e)})") from None
    if os.sep in name and name.count("/") != 1:
        raise ConfigError(f"{field} {name}: no such folder")
    try:
        return load(local_files_only=True)
    except (OSError, ValueError):
        pass
    if not reachable(HF_HOST):
        raise ConfigError(f"{field} {name!r}: not in the local Hugging Face cache and {HF_HOST} cannot be reached; "
                          f"download it where there is a network (`hf download {name}{files}`, into "
                          f"~/.cache/huggingface/hub){' or ' + instead if instead else ''}")
    try:
        return load()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field} {name!r}: could not be loaded ({first_line(e)})") from None
