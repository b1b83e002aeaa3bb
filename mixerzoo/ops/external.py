"""Lazy access to the optional GPU kernels of other packages: fla and mamba-ssm.

Neither package is needed on the CPU path, and importing them is costly (``import fla`` takes
seconds and pulls in transformers), so they are imported only when a CUDA tensor asks for
them, and only once. A loader returns the kernel or raises ``ImportError`` saying what to
install; :func:`optional` turns that into ``None`` for ``backend="auto"``.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import Callable


def _once(loader: Callable[[], Callable]) -> Callable[[], Callable]:
    """Run ``loader`` once; later calls return its kernel or raise its ImportError again.

    Caching the failure matters: ``backend="auto"`` asks on every forward, and a failed
    import re-scans the path each time it is retried. Only the message is kept: an exception
    object holds its traceback, whose frames hold their callers' frames and every tensor those
    reference (a whole forward pass), and re-raising the same object chains each new caller
    onto it, so a model without the package would keep a step's activations alive per step.
    """
    outcome: list = []

    def load_or_none() -> Callable | None:
        if not outcome:
            try:
                outcome.append((True, loader()))
            except ImportError as exc:
                outcome.append((False, str(exc)))
        ok, value = outcome[0]
        return value if ok else None

    @functools.wraps(loader)
    def wrapper() -> Callable:
        kernel = load_or_none()
        if kernel is None:
            raise ImportError(outcome[0][1])
        return kernel

    wrapper.load_or_none = load_or_none  # type: ignore[attr-defined]
    return wrapper


@_once
def load_fla_chunk_linear_attn() -> Callable:
    """fla's ``chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize)``.

    Layout ``[B, T, H, K]``; its defaults are ``scale=K**-0.5`` and ``normalize=True``, so
    callers pass both explicitly.
    """
    try:
        module = importlib.import_module("fla.ops.linear_attn")
    except Exception as exc:  # fla can fail on import for reasons other than absence
        raise ImportError(
            "the fla linear-attention kernel is not importable "
            f"({type(exc).__name__}: {exc}); install it with "
            "`pip install flash-linear-attention` or use backend='torch'"
        ) from exc
    return module.chunk_linear_attn


def _register_missing_selective_scan_cuda() -> bool:
    """Make ``import mamba_ssm`` work without its compiled Mamba-1 extension.

    mamba-ssm 2.3.x imports the compiled ``selective_scan_cuda`` extension at package import
    time, although Mamba-2's SSD kernels (``mamba_ssm.ops.triton.ssd_combined``) are pure
    Triton and never call it. A pure-Python install (``MAMBA_SKIP_CUDA_BUILD=TRUE``) lacks the
    extension, so the package import fails before the SSD module can load. An empty module
    under that name is enough for the SSD path; anything that does call the Mamba-1 selective
    scan would still fail loudly (AttributeError on the empty module). This is the only place
    in mixerzoo that works around it. Returns True when the empty module was registered.
    """
    if "selective_scan_cuda" in sys.modules:
        return False
    try:
        importlib.import_module("selective_scan_cuda")
        return False
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        return True


@_once
def load_mamba_chunk_scan_combined() -> Callable:
    """mamba-ssm's fused Mamba-2 SSD: ``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size,
    D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
    return_final_states=False)`` with x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``,
    B and C ``[B, T, G, N]``; returns ``y`` or ``(y, final_states [B, H, P, N])``.
    """
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        raise ImportError("mamba-ssm's SSD kernel needs triton; use backend='torch'") from exc
    registered = _register_missing_selective_scan_cuda()
    try:
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as exc:
        if registered:  # leave no trace of the workaround when it did not help
            sys.modules.pop("selective_scan_cuda", None)
        raise ImportError(
            "mamba-ssm's Mamba-2 SSD kernel is not importable "
            f"({type(exc).__name__}: {exc}); install it with "
            "`MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation` "
            "or use backend='torch'"
        ) from exc
    return module.mamba_chunk_scan_combined


@_once
def load_mamba_lm_head_model() -> Callable:
    """mamba-ssm's ``MambaLMHeadModel`` class (mamba_ssm/models/mixer_seq_simple.py), the
    reference LM of the Mamba-2 family; the same import workaround as the SSD kernel."""
    registered = _register_missing_selective_scan_cuda()
    try:
        module = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
    except Exception as exc:
        if registered:
            sys.modules.pop("selective_scan_cuda", None)
        raise ImportError(
            "mamba-ssm's MambaLMHeadModel is not importable "
            f"({type(exc).__name__}: {exc}); install it with "
            "`MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation`"
        ) from exc
    return module.MambaLMHeadModel


def optional(loader: Callable[[], Callable]) -> Callable | None:
    """The kernel from ``loader``, or None when it cannot be imported (for ``backend="auto"``).

    Asks a cached loader without raising, so that no exception (and no traceback holding the
    caller's tensors) is made on the hot path."""
    probe = getattr(loader, "load_or_none", None)
    if probe is not None:
        return probe()
    try:
        return loader()
    except ImportError:
        return None
