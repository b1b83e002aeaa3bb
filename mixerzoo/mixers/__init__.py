"""Sequence mixers, one module per family; each maps ``[B, T, d_model] -> [B, T, d_model]``.

- ``softmax``: :class:`SoftmaxAttention` (SDPA, RoPE, GQA, qk-norm)
- ``linear``: :class:`LinearAttention` (feature map, no denominator, output RMSNorm)
- ``mamba2``: :class:`Mamba2` (SSD block)
- ``loglinear``: :class:`LogLinearMamba2` (Mamba-2 block with log-linear attention and λ)

Nothing is imported here eagerly: the registry resolves ``"module:Class"`` strings, and a
class named below is imported on first attribute access.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Mixer": "mixerzoo.mixers.base",
    "SoftmaxAttention": "mixerzoo.mixers.softmax",
    "LinearAttention": "mixerzoo.mixers.linear",
    "Mamba2": "mixerzoo.mixers.mamba2",
    "LogLinearMamba2": "mixerzoo.mixers.loglinear",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
