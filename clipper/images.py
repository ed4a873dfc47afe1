"""Opening image files with errors that name the file (never a traceback from deep inside PIL)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ImageError, first_line

# Larger images are refused (decompression bombs); 89.5 MP is Pillow's own warning threshold.
MAX_PIXELS = 89_478_485
# Longer than this times their width (or the reverse): a resize of the short side to the model's
# size would ask for a huge image (4,000,000 x 10 -> 89,600,000 x 224).
MAX_ASPECT = 100
# The formats decoded; anything else (EPS would start Ghostscript, where installed) is refused.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pixels of an image whose decoder is written in Python (Pillow's registered decoders, e.g. BMP's
# RLE): ~0.1 s per megapixel, so a 25 KB RLE8 BMP of 6000 x 6000 would hold a worker for 4 s.
MAX_PYTHON_DECODED_PIXELS = 4_000_000


@contextlib.contextmanager
def _opened(data: bytes, where: str, max_pixels: int) -> Iterator[Image.Image]:
    """`data` opened by Pillow (one of FORMATS), every error it raises turned into an ImageError."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            yield im
    except ImageError:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's own limit: refused before our check
        raise ImageError(f"{where}: exceeds the pixel limit ({max_pixels})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image (unknown format); formats read: {', '.join(FORMATS)}") from None
    except Exception as e:  # untrusted bytes: PIL's plugins raise many types (OSError, ValueError, SyntaxError...)
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {first_line(e)})") from None


def decode_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """An RGB or L image from encoded bytes (one of FORMATS, within the pixel and aspect limits);
    `where` names the input in errors. With `draft_size`, a JPEG at least twice that size on both
    sides is decoded at a reduced scale (1/2 .. 1/8, in the DCT: much faster) that still covers
    `draft_size` on both sides."""
    with _opened(data, where, max_pixels) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(f"{where}: {w}x{h} exceeds the pixel limit ({max_pixels})")
        if min(w, h) < 1:
            raise ImageError(f"{where}: {w}x{h} has no pixels")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise ImageError(f"{where}: {w}x{h} is outside the aspect ratio limit ({MAX_ASPECT}:1)")
        if w * h > MAX_PYTHON_DECODED_PIXELS and any(tile[0] in Image.DECODERS for tile in im.tile):
            raise ImageError(f"{where}: {w}x{h} {im.format} with a slow (pure-Python) decoder: at most "
                             f"{MAX_PYTHON_DECODED_PIXELS} pixels")
        if draft_size and im.format == "JPEG":
            im.draft(im.mode, (draft_size, draft_size))
        im.load()
        return im.copy() if im.mode in ("RGB", "L") else im.convert("RGB")


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from the header alone (nothing decoded), for budgets across several images."""
    with _opened(data, where, MAX_PIXELS) as im:
        return im.size



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
