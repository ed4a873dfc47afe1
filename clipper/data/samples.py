"""What every source yields: a Sample to write, or a Rejected input with its reason."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Sample:
    key: str  # unique within a dataset, no dots (webdataset splits file names at the first dot)
    image: bytes | Image.Image | np.ndarray  # bytes are kept as they are, in format `ext`
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    ext: str = "png"

    def image_bytes(self) -> tuple[bytes, str]:
        """(encoded image, extension): bytes pass through; arrays and PIL images become PNG."""
        if isinstance(self.image, bytes):
            return self.image, self.ext
        im = Image.fromarray(self.image) if isinstance(self.image, np.ndarray) else self.image
        buf = io.BytesIO()
        im.save(buf, format="PNG")  # zlib at a fixed level: the same pixels give the same bytes
        return buf.getvalue(), "png"


@dataclass
class Rejected:
    source_id: str
    reason: str
