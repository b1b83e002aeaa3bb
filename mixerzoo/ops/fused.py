"""Which implementation of a model's small ops runs: part of the model, chosen when it is built.

``kernels="fused"``: the fused ops (norms, the SwiGLU product, the short convolution, rotary
embeddings, the LM loss), which save fewer and smaller tensors for backward and launch fewer
kernels (Triton on CUDA, hand-written torch autograd elsewhere). ``kernels="reference"``: the
plain torch code each of them replaces, which is also the reference it is tested against.
A model's config holds the choice and passes it to every module that has such an op when it is
constructed; nothing reads a process-wide setting at run time. ``MIXERZOO_FUSED=0`` in the
environment only changes the default for models built afterwards.
"""

from __future__ import annotations

import os

import torch

KERNELS = ("fused", "reference")


def check_kernels(value: object, where: str = "kernels") -> str:
    """``value`` if it is one of :data:`KERNELS`, else an error naming the allowed values."""
    if value not in KERNELS:
        raise ValueError(f"{where} must be one of {list(KERNELS)}, got {value!r}")
    return value  # type: ignore[return-value]


def default_kernels() -> str:
    """The kernels of a model built without naming them: "fused", unless ``MIXERZOO_FUSED`` is
    0 / false / no / off (then "reference")."""
    off = os.environ.get("MIXERZOO_FUSED", "1").strip().lower() in ("0", "false", "no", "off")
    return "reference" if off else "fused"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` would run in: autocast's where it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
