"""One switch between the fused training ops and the plain torch code they replace.

The fused ops (norms, the SwiGLU product, the short convolution, rotary embeddings, the LM
loss) save fewer and smaller tensors for backward and launch fewer kernels; the plain code
stays as their reference. ``MIXERZOO_FUSED=0`` in the environment, ``set_fused(False)`` or
``with fused(False):`` runs the reference everywhere, which is how benchmarks measure
"before" and tests compare the two paths through whole models.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

_enabled = os.environ.get("MIXERZOO_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def fused_enabled() -> bool:
    return _enabled


def set_fused(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


@contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """Run a block of code with the fused ops switched on or off, restoring the setting after."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` would run in: autocast's where it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
