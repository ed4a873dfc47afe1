"""Opening image files with errors that name the file (never a traceback from deep inside PIL)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ImageError

# Larger images are refused (decompression bombs); 89.5 MP is Pillow's own warning threshold.
MAX_PIXELS = 89_478_485


def decode_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """An RGB or L image from encoded bytes; `where` names the input in errors. With `draft_size`,
    a JPEG at least twice that size on both sides is decoded at a reduced scale (1/2 .. 1/8, in
    the DCT: much faster) that still covers `draft_size` on both sides."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{where}: {im.width}x{im.height} exceeds the pixel limit ({max_pixels})")
            if draft_size and im.format == "JPEG":
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            return im.copy() if im.mode in ("RGB", "L") else im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image (unknown format)") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageError(f"{where}: not a readable image ({e})") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: unreadable ({e.strerror})") from None


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    path = Path(path)
    return decode_image(_read(path), str(path), max_pixels)


def image_file_bytes(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str]:
    """(bytes, 'jpg' | 'png') of an image file, checked to decode: JPEG and PNG files pass through
    untouched, other formats are re-encoded as PNG."""
    path = Path(path)
    data = _read(path)  # read once: checked by decoding, then stored as it is
    im = decode_image(data, str(path), max_pixels)
    if data[:3] == b"\xff\xd8\xff":
        return data, "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data, "png"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), "png"
