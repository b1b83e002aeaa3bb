"""One backbone for every mixer: pre-RMSNorm → mixer → residual → RMSNorm → SwiGLU → residual.

The block does not know its mixer; it only relies on the contract in ``mixers/base.py``.
Its norms and MLP run the fused ops or the plain torch code by ``kernels``, fixed when they
are built (``mixerzoo.ops.fused``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mixers.base import Mixer
from ..ops.fused import check_kernels, compute_dtype


class RMSNorm(nn.Module):
    """RMSNorm over the last dim ``[..., d]``, computed in fp32."""

    def __init__(self, d: int, eps: float = 1e-5, kernels: str = "fused"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.kernels = check_kernels(kernels)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernels={self.kernels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "fused":
            from ..ops.norms import rms_norm

            # Returned in the matmul dtype: every consumer is a projection, which would cast.
            return rms_norm(x, self.weight, self.eps, out_dtype=compute_dtype(x))
        # Normalise in fp32: bf16 squares lose too many bits for a stable mean.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate) * up)`` with ``[gate; up] = gate_up(x)``, ``[..., d] -> [..., d]``."""

    def __init__(self, d_model: int, hidden: int, kernels: str = "fused"):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.kernels = check_kernels(kernels)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "fused":
            from ..ops.swiglu import swiglu_linear

            # the [.., hidden] product is recomputed in backward instead of kept
            return swiglu_linear(self.gate_up(x), self.down.weight)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def from_residual(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """``self(norm(x))`` with the norm fused into the up-projection: neither the norm
        output nor the ``[.., hidden]`` product is kept for backward."""
        from ..ops.norms import rms_norm_linear
        from ..ops.swiglu import swiglu_linear

        gate_up = rms_norm_linear(x, norm.weight, self.gate_up.weight, norm.eps, out_dtype=compute_dtype(x))
        return swiglu_linear(gate_up, self.down.weight)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int, eps: float, kernels: str = "fused"):
        super().__init__()
        self.kernels = check_kernels(kernels)
        self.mixer_norm = RMSNorm(d_model, eps, kernels)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps, kernels)
        self.mlp = SwiGLU(d_model, mlp_hidden, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mixer, Mixer):
            # the contract's forward_normed: self(norm(x)), or the pre-norm fused into the
            # mixer's first projection where it does so
            y = self.mixer.forward_normed(x, self.mixer_norm)
        else:  # any causal nn.Module is a mixer too
            y = self.mixer(self.mixer_norm(x))
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"mixer {type(self.mixer).__name__} returned {got} for an input of shape "
                             f"{tuple(x.shape)}: a mixer must map [B, T, d_model] to the same shape "
                             "(mixerzoo.testing.check_mixer checks the whole contract)")
        x = x + y
        if self.kernels == "fused":
            return x + self.mlp.from_residual(x, self.mlp_norm)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """``x_t [B, d]`` one token through the block from the mixer's recurrent state."""
        y, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + y
        return x_t + self.mlp(self.mlp_norm(x_t)), state

    def prefill(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """``x [B, T, d]`` many tokens from a state (parallel where the mixer allows)."""
        y, state = self.mixer.prefill(self.mixer_norm(x), state)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state
