"""Where one image to embed lives (a whole file, or a member of a shard by offset), and what was
passed over, as `clipper embed` records them; apart from the listing (`inputs`), so that the
embedding verbs read items without the shard readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .remote import is_url, local_shard


@dataclass(frozen=True)
class ImageItem:
    """Where one image's bytes live: a whole file, or `size` bytes at `offset` in a shard."""
    id: str
    path: str
    offset: int = 0
    size: int = -1
    caption: str | None = None

    def read(self) -> bytes:
        with open(local_shard(self.path), "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    def record(self) -> dict:
        """The row of ids.jsonl: id, caption, and where the bytes are (absolute path; for a shard
        member its offset and size), so that a server started anywhere can show the image."""
        row = {"id": self.id, "path": self.path if is_url(self.path) else str(Path(self.path).resolve())}
        if self.size >= 0:
            row |= {"offset": self.offset, "size": self.size}
        return row | {"caption": self.caption} if self.caption is not None else row


@dataclass(frozen=True)
class InputSkip:
    id: str
    reason: str
