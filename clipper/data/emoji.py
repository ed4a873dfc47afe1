"""Emoji pairs (docs/protocol.md, "Data"): Noto Color Emoji glyphs named by Unicode CLDR.

Every CLDR sequence with a `tts` name whose code points the font has and which the font shapes
as one glyph, rendered to 64x64 RGB on white; texts are the tts name and the keyword list; an
emoji is in the test split when sha1(cp) % 5 == 0.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .debian import package_file
from .framing import square_on_white
from .npm import StyleImages
from ..errors import ConfigError, DataError, MissingFileError
from .instructions import emoji_conversations
from .samples import Sample

FONT_PACKAGE, FONT_PATH = "fonts-noto-color-emoji", "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR_PACKAGE = "unicode-cldr-core"
CLDR_FILES = ("usr/share/unicode/cldr/common/annotations/en.xml",
              "usr/share/unicode/cldr/common/annotationsDerived/en.xml")
# Styles (docs/protocol.md): Noto from the Debian font, the others from npm (clipper.data.npm). Only
# the training styles are ever trained on; Apple and Facebook are for evaluation.
STYLES = ("noto", "twemoji", "apple", "facebook")
TRAIN_STYLES = ("noto", "twemoji")
# Unicode's group and subgroup of each emoji (emoji-test.txt): metadata, and instruction answers
GROUPS_PACKAGE, GROUPS_PATH = "unicode-data", "usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # the only size of the font's colour bitmaps
IMAGE_SIZE = 64
VS16, ZWJ = "\ufe0f", "\u200d"


@dataclass
class EmojiPair:
    cp: str  # the CLDR string
    name: str  # the tts name
    keywords: list[str]
    text: str  # what is rendered: cp, or cp with U+FE0F added where that shapes narrower

    @property
    def split(self) -> str:
        return split_of(self.cp)

    @property
    def key(self) -> str:
        return "u" + "-".join(f"{ord(c):x}" for c in self.cp)


def split_of(cp: str) -> str:
    return "test" if int(hashlib.sha1(cp.encode("utf-8")).hexdigest(), 16) % 5 == 0 else "train"


def read_groups(path: Path) -> dict[str, tuple[str, str]]:
    """(group, subgroup) by emoji string (also without its U+FE0F) from Unicode's emoji-test.txt."""
    out: dict[str, tuple[str, str]] = {}
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line:
            try:
                cp = "".join(chr(int(h, 16)) for h in line.split(";", 1)[0].split())
            except ValueError:
                raise DataError(f"{path}: not a code point list: {line[:60]!r}") from None
            out.setdefault(cp, (group, subgroup))
            out.setdefault(cp.replace(VS16, ""), (group, subgroup))
    return out


def emoji_groups(cache: str | os.PathLike | None = None) -> dict[str, tuple[str, str]]:
    """Unicode's groups, from Debian's unicode-data (fetched if needed); none where it cannot be had."""
    import sys

    from ..errors import PackageError

    try:
        return read_groups(package_file(GROUPS_PACKAGE, GROUPS_PATH, cache))
    except PackageError as e:
        print(f"emoji: no Unicode groups in the metadata ({e})", file=sys.stderr)
        return {}


def read_annotations(paths: list[Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(tts names, keyword lists) by CLDR string; the first file wins on duplicates."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            raise DataError(f"{path}: not a readable CLDR annotation file ({e})") from None
        for node in root.iter("annotation"):
            cp, text = node.get("cp"), (node.text or "").strip()
            if not cp or not text:
                continue
            if node.get("type") == "tts":
                names.setdefault(cp, text)
            elif node.get("type") is None:
                keywords.setdefault(cp, [k.strip() for k in text.split("|") if k.strip()])
    return names, keywords


def _is_base(c: str) -> bool:
    o = ord(c)
    return not (c in (VS16, ZWJ) or 0x1F3FB <= o <= 0x1F3FF or o == 0x20E3 or 0xE0020 <= o <= 0xE007F)


def _fully_qualified(cp: str) -> str:
    """cp with U+FE0F after every base code point that lacks one (CLDR omits them)."""
    out = []
    for i, c in enumerate(cp):
        out.append(c)
        if _is_base(c) and cp[i + 1: i + 2] != VS16:
            out.append(VS16)
    return "".join(out)


class EmojiFont:
    def __init__(self, path: str | os.PathLike):
        from fontTools.ttLib import TTFont

        self.path = Path(path)
        try:
            self.cmap = set(TTFont(str(path), lazy=True).getBestCmap())
            self.font = ImageFont.truetype(str(path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        except Exception as e:  # fontTools and FreeType raise many types for a bad font file
            raise DataError(f"{path}: not a usable emoji font ({e})") from None
        self.single_width = self.font.getlength("\U0001F600")

    def has_glyphs(self, cp: str) -> bool:
        return all(ord(c) in self.cmap for c in cp if c not in (VS16, ZWJ))

    def one_glyph_form(self, cp: str) -> str | None:
        """The form of cp that shapes narrowest, or None if even that falls apart into several glyphs."""
        text = min({cp, _fully_qualified(cp)}, key=lambda t: (self.font.getlength(t), len(t)))
        return text if self.font.getlength(text) <= 1.5 * self.single_width else None

    def render(self, text: str, size: int = IMAGE_SIZE) -> Image.Image:
        """text drawn in colour on white, cropped to its content, padded square, resized (LANCZOS)."""
        left, top, right, bottom = self.font.getbbox(text)
        pad = 8
        canvas = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=self.font, embedded_color=True)
        return square_on_white(canvas, size, repr(text))


def find_files(font: str | os.PathLike | None = None, cldr_root: str | os.PathLike | None = None,
               cache: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """(font file, [en.xml, derived en.xml]): given paths, else Debian's packages (fetched if needed)."""
    font_path = Path(font) if font else package_file(FONT_PACKAGE, FONT_PATH, cache)
    if cldr_root:
        cldr = [Path(cldr_root) / Path(p).relative_to("usr/share/unicode/cldr") for p in CLDR_FILES]
    else:
        cldr = [package_file(CLDR_PACKAGE, p, cache) for p in CLDR_FILES]
    for p in [font_path, *cldr]:
        if not p.is_file():
            raise MissingFileError(f"{p}: no such file")
    return font_path, cldr


def pairs(font: EmojiFont, annotation_files: list[Path]) -> list[EmojiPair]:
    """Every renderable named emoji, in CLDR file order."""
    names, keywords = read_annotations(annotation_files)
    out = []
    for cp, name in names.items():
        if not font.has_glyphs(cp):
            continue
        text = font.one_glyph_form(cp)
        if text is not None:
            out.append(EmojiPair(cp=cp, name=name, keywords=keywords.get(cp, []), text=text))
    return out


def samples(split: str, font: str | os.PathLike | None = None, cldr_root: str | os.PathLike | None = None,
            cache: str | os.PathLike | None = None, styles: Sequence[str] = ("noto",)) -> Iterator[Sample]:
    """Rendered pairs of one split ('train', 'val', 'test' or 'all'), each emoji in every style of
    `styles` that has it, one after the other (`plan`): txt = tts name; keywords, style and split
    in the metadata, Unicode's group and subgroup where known, and (train) questions about the emoji
    with their answers in LLaVA's conversation form (clipper.data.instructions)."""
    emoji_font, drawn, rows = plan(split, font, cldr_root, cache, styles)
    groups = emoji_groups(cache)
    for pair, style, where in rows:
        image = emoji_font.render(pair.text) if style == "noto" else drawn[style].image(pair.cp, IMAGE_SIZE)
        meta = {"split": where, "source_id": pair.cp, "cp": pair.cp, "name": pair.name, "keywords": pair.keywords,
                "style": style}
        if pair.cp in groups or pair.cp.replace(VS16, "") in groups:
            meta["group"], meta["subgroup"] = groups.get(pair.cp) or groups[pair.cp.replace(VS16, "")]
        if where == "train":  # questions about it and their answers (the test split holds none)
            meta["conversations"] = emoji_conversations(meta)
        yield Sample(key=pair.key if style == "noto" else f"{pair.key}_{style}", image=image, text=pair.name,
                     meta=meta)


def plan(split: str, font: str | os.PathLike | None = None, cldr_root: str | os.PathLike | None = None,
         cache: str | os.PathLike | None = None, styles: Sequence[str] = ("noto",)):
    """(the font, the other styles' images, [(pair, style, split)]) of `samples`, nothing drawn yet.
    The emoji are the Noto font's; a test emoji (sha1(cp) % 5 == 0) is test in every style.
    Training styles (TRAIN_STYLES) give 'train' and 'test'; the evaluation-only ones give 'val'
    (the training emoji, drawn in a style never trained on) and 'test'."""
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split: {split!r} is not one of train, val, test, all")
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ConfigError(f"styles: {', '.join(unknown) or 'none given'}: not among {', '.join(STYLES)}")
    font_path, cldr = find_files(font, cldr_root, cache)
    emoji_font = EmojiFont(font_path)
    drawn = {style: StyleImages(style, cache) for style in styles if style != "noto"}
    rows = [(pair, style, style_split(pair.split, style)) for pair in pairs(emoji_font, cldr) for style in styles
            if style == "noto" or drawn[style].has(pair.cp)]
    return emoji_font, drawn, [row for row in rows if split in ("all", row[2])]


def style_split(emoji_split: str, style: str) -> str:
    """The split of an emoji of split `emoji_split` drawn in `style`."""
    if emoji_split == "test" or style in TRAIN_STYLES:
        return emoji_split
    return "val"
