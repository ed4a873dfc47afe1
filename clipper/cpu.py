"""What the CPU is (Linux /proc/cpuinfo; nothing known elsewhere): kernels are chosen by it."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("flags", "vendor_id", "model name"), or ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags."""
    return frozenset(cpuinfo("flags").split())
