"""Zero-shot prompt templates: "a photo of a {}." with the class name where the braces are."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: Sequence[str], where: str = "") -> list[str]:
    """The templates, each with exactly one '{}' where the label goes; `where` (a file) prefixes errors."""
    for t in templates:
        try:
            ok = t.count("{}") == 1 and bool(t.format("x"))
        except (ValueError, IndexError, KeyError):  # other braces: "{} {", "{0}", "{name}"
            ok = False
        if not ok:
            raise ConfigError(f"{where + ': ' if where else ''}template {t!r}: needs exactly one '{{}}' where the "
                              "label goes, and no other braces")
    return list(templates)
