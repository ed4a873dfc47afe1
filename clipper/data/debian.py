"""Files from Debian packages: use the system's copy, else `apt-get download` + `dpkg-deb -x`
into a cache folder (no root needed once apt's package lists exist)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import PackageError

DEFAULT_CACHE = Path(os.environ.get("CLIPPER_DATA_CACHE", Path(__file__).resolve().parents[2] / "data" / "cache"))


def package_file(package: str, relpath: str, cache: str | os.PathLike | None = None) -> Path:
    """Path of `/relpath` from Debian package `package`, fetching and unpacking it if needed."""
    system = Path("/") / relpath
    if system.exists():
        return system
    root = Path(cache or DEFAULT_CACHE) / "debian" / package
    unpacked = root / "root" / relpath
    if unpacked.exists():
        return unpacked
    _fetch(package, root)
    if not unpacked.exists():
        raise PackageError(f"package {package} does not contain /{relpath}")
    return unpacked


def _fetch(package: str, root: Path) -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PackageError(f"{tool} not found: on a non-Debian system, download the {package} files "
                               "yourself and pass their folder (see data/README.md)")
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.deb"):
        old.unlink()
    got = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True)
    debs = sorted(root.glob(f"{package}_*.deb"))
    if got.returncode != 0 or not debs:
        reason = (got.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise PackageError(f"apt-get download {package} failed ({reason}). Run `apt-get update` (as root) "
                           f"once, or install it: `apt-get install {package}`")
    tmp = root / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
    shutil.rmtree(root / "root", ignore_errors=True)
    tmp.rename(root / "root")  # a half-unpacked tree is never mistaken for a complete one
    debs[-1].unlink()
