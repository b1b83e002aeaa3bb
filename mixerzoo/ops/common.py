"""What the op families share: the accumulation dtype of their torch paths."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 when the inputs are fp64, otherwise fp32 (bf16/fp16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
