from .clip import CLIP
from .text import TextTransformer
from .transformer import Transformer
from .vision import VisionTransformer

__all__ = ["CLIP", "TextTransformer", "Transformer", "VisionTransformer"]
