"""Models: config, size presets with parameter matching, the backbone and its transformers face."""

from .build import build_config, build_model, param_target
from .config import MixerZooConfig
from .sizes import SIZES

__all__ = ["MixerZooConfig", "SIZES", "build_config", "build_model", "param_target"]
