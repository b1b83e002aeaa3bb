"""Test session setup: Triton interpreter on CPU-only machines, GPU tests skipped there."""

from __future__ import annotations

import os

# The Triton interpreter must be chosen before triton is first imported, so that CPU runs
# exercise the kernels' code; GPU runs (CUDA present) compile them for real.
import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
