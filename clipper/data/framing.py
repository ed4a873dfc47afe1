"""How every emoji rendering is framed (the protocol's): on white, cropped to its drawing, padded
square, resized. Noto's glyphs (`emoji`) and the npm image sets (`npm`) both go through it."""

from __future__ import annotations

from PIL import Image, ImageChops

from ..errors import DataError


def square_on_white(canvas: Image.Image, size: int, what: str) -> Image.Image:
    """An RGB drawing on white cropped to its content, padded square with white, resized (LANCZOS):
    the protocol's framing of every emoji rendering."""
    box = ImageChops.difference(canvas, Image.new("RGB", canvas.size, "white")).getbbox()
    if box is None:
        raise DataError(f"{what} renders as nothing")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)
