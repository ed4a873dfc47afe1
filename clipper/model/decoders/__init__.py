"""Caption decoders behind one interface (`base`): the registry of decoder kinds, the one list of them."""

from __future__ import annotations

from ...config import ModelConfig
from ...errors import ConfigError
from .base import Captioner, Codec, Decoder, PaddedKVCache, TextCodec
from .coca import CoCaDecoder
from .llava import LlavaDecoder
from .prefix import PrefixDecoder

# DecoderConfig.kind -> the module
DECODERS: dict[str, type[Decoder]] = {"prefix": PrefixDecoder, "coca": CoCaDecoder, "llava": LlavaDecoder}


def check_decoder(model: ModelConfig) -> type[Decoder] | None:
    """The decoder class of `model`'s config (None: no decoder), after its kind has accepted the
    model it sits on (ConfigError otherwise)."""
    cfg = model.decoder
    if cfg is None:
        return None
    if cfg.kind not in DECODERS:
        raise ConfigError(f"decoder.kind: {cfg.kind!r} is not one of {', '.join(DECODERS)}")
    DECODERS[cfg.kind].check(cfg, model)
    return DECODERS[cfg.kind]


def build_decoder(model: ModelConfig) -> Decoder:
    """A freshly initialised decoder for a model of config `model` (which has one)."""
    return check_decoder(model).for_model(model.decoder, model)


__all__ = ["DECODERS", "Captioner", "Codec", "Decoder", "PaddedKVCache", "TextCodec", "build_decoder",
           "check_decoder"]
