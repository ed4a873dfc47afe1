"""Emoji drawn by other artists (issue #18): the 64 px PNGs of the npm packages
`emoji-datasource-{twitter,apple,facebook}` (fetched with `npm pack` into the data cache), found by
code points through the package's emoji.json (each entry's `unified` and `non_qualified` forms and
its skin-tone variations)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

from ..errors import DataError, PackageError
from .debian import DEFAULT_CACHE
from .framing import square_on_white

PACKAGES = {"twemoji": "emoji-datasource-twitter", "apple": "emoji-datasource-apple",
            "facebook": "emoji-datasource-facebook"}
VERSION = "16.0.0"
MAX_IMAGE_BYTES = 1 << 20


def package_tarball(style: str, cache: str | os.PathLike | None = None) -> Path:
    """The package's .tgz in CACHE/npm (`npm pack` it there if it is not yet)."""
    name = PACKAGES[style]
    folder = Path(cache or DEFAULT_CACHE) / "npm"
    path = folder / f"{name}-{VERSION}.tgz"
    if path.is_file():
        return path
    if shutil.which("npm") is None:
        raise PackageError(f"npm not found: install it (apt-get install npm) or put {path.name} "
                           f"(npm pack {name}@{VERSION}) into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    got = subprocess.run(["npm", "pack", f"{name}@{VERSION}", "--silent"], cwd=tmp, capture_output=True, text=True)
    packed = tmp / path.name
    if got.returncode != 0 or not packed.is_file():
        reason = (got.stderr.strip().splitlines() or ["no tarball written"])[-1]
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackageError(f"npm pack {name}@{VERSION} failed ({reason})")
    os.rename(packed, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def _code(cp: str) -> str:
    return "-".join(f"{ord(c):04X}" for c in cp)


class StyleImages:
    """One package's images by CLDR string, framed like the Noto renderings (on white, cropped to
    content, padded square, resized: `framing.square_on_white`). The package
    is read in one pass (a .tgz cannot be read by offset): emoji.json and the 64 px PNGs, ~20 MB."""

    def __init__(self, style: str, cache: str | os.PathLike | None = None):
        self.style, self.path = style, package_tarball(style, cache)
        folder = PACKAGES[style].removeprefix("emoji-datasource-")
        prefix = f"package/img/{folder}/64/"
        files: dict[str, bytes] = {}
        entries = None
        try:
            with tarfile.open(self.path, "r:gz") as tar:
                for info in tar:
                    if not info.isfile() or info.size > MAX_IMAGE_BYTES << 4:
                        continue
                    if info.name == "package/emoji.json":
                        entries = json.load(tar.extractfile(info))
                    elif info.name.startswith(prefix) and info.size <= MAX_IMAGE_BYTES:
                        files[info.name[len(prefix):]] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise DataError(f"{self.path}: not a readable {PACKAGES[style]} package ({e})") from None
        if not isinstance(entries, list):
            raise DataError(f"{self.path}: no package/emoji.json list in it")
        self._images: dict[str, bytes] = {}
        for entry in entries:
            for variant in [entry, *(entry.get("skin_variations") or {}).values()]:
                data = files.get(variant.get("image") or "") if variant.get(f"has_img_{folder}") else None
                for code in (variant.get("unified"), variant.get("non_qualified")):
                    if data is not None and code:
                        self._images.setdefault(code.upper(), data)

    def _data(self, cp: str) -> bytes | None:
        return self._images.get(_code(cp)) or self._images.get(_code(cp.replace("\ufe0f", "")))

    def has(self, cp: str) -> bool:
        return self._data(cp) is not None

    def image(self, cp: str, size: int = 64) -> Image.Image:
        """The emoji `cp` as an RGB image on white, `size` square, framed as the protocol says."""
        try:
            im = Image.open(io.BytesIO(self._data(cp)))
            rgba = im.convert("RGBA")
        except (OSError, TypeError) as e:
            raise DataError(f"{self.path}: the {self.style} image of {cp!r} is unreadable ({e})") from None
        on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return square_on_white(on_white, size, f"the {self.style} image of {cp!r}")
