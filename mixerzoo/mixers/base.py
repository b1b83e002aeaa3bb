"""The contract every mixer honours, and the backend choice shared by kernel-backed mixers.

A mixer maps ``[B, T, d_model] -> [B, T, d_model]`` causally. It is built as
``cls(d_model, layer_idx=i, **options)``; the backbone around it never knows which one it is.
Recurrent decoding: ``init_state`` / ``step`` (one token), ``prefill`` (many tokens from a
state) and ``state_size`` (elements of recurrent state per sequence). ``forward_normed(x,
norm)`` is ``self(norm(x))`` unless a mixer fuses the block's pre-norm into its projection.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mixerzoo.ops.external import optional

logger = logging.getLogger("mixerzoo")

_announced: set[tuple[str, str]] = set()


def check_backend(backend: str, allowed: tuple[str, ...]) -> str:
    """Validate a ``backend=`` option against the ones a mixer supports."""
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not one of {allowed}")
    return backend


def announce_backend(mixer: str, backend: str) -> None:
    """Log the backend a mixer family actually runs, once per (family, backend)."""
    key = (mixer, backend)
    if key not in _announced:
        _announced.add(key)
        logger.info("mixerzoo: %s runs the %s backend", mixer, backend)


def pick_kernel_backend(requested: str, x: torch.Tensor, loader, what: str) -> str:
    """Resolve ``"auto"``/``"triton"`` for a mixer whose GPU path is another package's kernel.

    ``loader`` returns the kernel or raises ImportError with install advice (ops/external.py).
    "auto" takes the kernel for CUDA tensors when it imports, else "torch"; an explicit
    "triton" that cannot run raises; other backends pass through.
    """
    if requested == "auto":
        return "triton" if x.is_cuda and optional(loader) is not None else "torch"
    if requested == "triton":
        if not x.is_cuda:
            raise RuntimeError(
                f"{what} backend='triton' needs CUDA tensors; use backend='torch' or 'auto' on the CPU"
            )
        loader()  # raises ImportError with install advice
    return requested


class Mixer(nn.Module):
    """Base class: subclasses implement ``forward`` and, for decoding, ``init_state``/``step``.

    ``last_backend`` records what the most recent forward actually ran ("torch", "triton",
    "sdpa", "fla", "mamba_ssm", ...), so that ``model.backends()`` can report it.
    """

    # True for mixers whose constructor takes ``kernels="fused" | "reference"`` (the model's
    # choice of the small ops' implementation); the model passes its own only to those
    accepts_kernels: bool = False

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.last_backend: str | None = None

    def extra_repr(self) -> str:
        kernels = getattr(self, "kernels", None)
        return f"kernels={kernels}" if kernels is not None else ""

    def _ran(self, backend: str) -> None:
        self.last_backend = backend
        announce_backend(type(self).__name__, backend)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__} expects [B, T, {self.d_model}], got {tuple(x.shape)}"
            )

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``self(norm(x))`` for the block's pre-norm ``norm``: ``[B, T, d_model] -> [B, T, d_model]``.

        A mixer may override it to fuse the norm into its first projection (Mamba-2 does, with
        its fused kernels); the result must equal ``self(norm(x))``.
        """
        return self(norm(x))

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support recurrent decoding")

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token: ``x_t [B, d_model] -> (y_t [B, d_model], new state)``."""
        raise NotImplementedError(f"{type(self).__name__} does not support recurrent decoding")

    def prefill(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Consume ``x [B, T, d_model]`` from ``state``; returns ``(y [B, T, d_model], state)``.

        The default steps token by token; mixers override it with a parallel version.
        """
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), state

    def state_size(self, seq_len: int) -> int:
        """Elements of recurrent state per sequence after ``seq_len`` tokens."""
        raise NotImplementedError
