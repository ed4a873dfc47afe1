"""clipper: CLIP-style image-text embeddings, fast on CPUs, interoperable with OpenCLIP."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig, TextConfig, VisionConfig, list_presets, preset
from .factory import load
from .model import CLIP
from .tokenizer import Tokenizer

__all__ = ["CLIP", "CheckpointError", "ConfigError", "ModelConfig", "TextConfig", "Tokenizer", "VisionConfig",
           "list_presets", "load", "load_model", "preset", "save_model"]
__version__ = "0.1.0"
