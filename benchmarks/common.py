"""Shared helpers for the benchmarks: timing side by side, machine description, results JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# The CPU features the speed figures depend on (oneDNN's AVX-512 and bf16 paths, fbgemm's int8).
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def machine() -> dict:
    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f in _FLAGS]
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def peak_rss_mib() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would include its parent's at fork)."""
    import resource

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def interleaved_rates(fns: dict[str, Callable[[], None]], items_per_call: int, repeats: int,
                      warmup: int = 1) -> dict[str, dict]:
    """Run each fn `warmup` times, then `repeats` rounds of one call each, alternating between
    fns so that machine noise hits all of them alike. Returns items/s (median and best) per fn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"per_s_median": items_per_call / statistics.median(t), "per_s_best": items_per_call / min(t),
                   "seconds": t} for name, t in times.items()}


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
