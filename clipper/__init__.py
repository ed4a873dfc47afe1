"""clipper: CLIP-style image-text embeddings, fast on CPUs, interoperable with OpenCLIP."""

from .checkpoint import save_model
from .config import ModelConfig, TextConfig, VisionConfig
from .presets import list_presets, preset
from .errors import CheckpointError, ClipperError, ConfigError
from .factory import load, load_model
from .model import CLIP
from .tokenizer import Tokenizer
from .version import __version__

__all__ = ["CLIP", "CheckpointError", "ClipperError", "ConfigError", "ModelConfig", "TextConfig", "Tokenizer", "VisionConfig",
           "list_presets", "load", "load_model", "preset", "save_model", "__version__"]
