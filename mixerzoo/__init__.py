"""mixerzoo: a zoo of sequence mixers behind one model API.

>>> from mixerzoo import build_model
>>> model = build_model("loglinear_adaptive", size="350m")   # doctest: +SKIP

Heavy modules (transformers, the mixers) are imported on first use, so ``import mixerzoo``
and ``mixerzoo list`` stay fast.
"""

from __future__ import annotations

from typing import Any

from .registry import list_mixers, load_registry, register_mixer

__version__ = "0.1.0"
__all__ = ["build_model", "build_config", "list_mixers", "load_registry", "register_mixer", "load_model"]


def build_model(name, size: str = "tiny", **kwargs: Any):
    from .models.build import build_model as _build

    return _build(name, size, **kwargs)


def build_config(name, size: str = "tiny", **kwargs: Any):
    from .models.build import build_config as _build

    return _build(name, size, **kwargs)


def load_model(path: str, **kwargs: Any):
    """Load a saved mixerzoo model directory (``save_pretrained`` output)."""
    from .models.io import load_model as _load

    return _load(path, **kwargs)
