"""Point-wise steps of the mixers that are computed in fp32 but kept in the activation dtype.

Written as plain torch code, ``(x.float() * dt).to(bf16)`` makes autograd keep the fp32
upcast of x for the backward: 4 bytes an element on top of the bf16 x that is alive anyway.
Each Function here computes in fp32 like that code, returns the activation dtype and saves
only tensors that exist already (or none), recomputing the rest in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _MulDt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt):
        ctx.save_for_backward(x, dt)
        return (x.float() * dt[..., None]).to(x.dtype)

    @staticmethod
    def backward(ctx, dv):
        x, dt = ctx.saved_tensors
        dvf = dv.float()
        dx = (dvf * dt[..., None]).to(x.dtype) if ctx.needs_input_grad[0] else None
        ddt = (dvf * x.float()).sum(-1).to(dt.dtype) if ctx.needs_input_grad[1] else None
        return dx, ddt


def mul_dt(x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, P] · dt [B, T, H]`` in fp32, returned in x's dtype (Mamba-2's ``v = x·dt``)."""
    if x.shape[:-1] != dt.shape:
        raise ValueError(f"mul_dt: x {tuple(x.shape)} and dt {tuple(dt.shape)} must agree up to x's last dim")
    return _MulDt.apply(x, dt)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.save_for_backward(x)
        return F.softplus(x.float()).to(dtype)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return (dy.float() * torch.sigmoid(x.float())).to(x.dtype), None


def softplus(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softplus(x) in fp32, returned in ``dtype`` (default x's); saves only x."""
    return _Softplus.apply(x, dtype or x.dtype)


def rope_angles(T: int, d: int, start: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, d]`` (fp32, rotate-half layout) for positions ``start .. start + T - 1``."""
    # Angles in fp32: in bf16 the position * frequency product loses whole radians at long T.
    inv_freq = base ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        # A rotation's transpose is the rotation by the opposite angle: nothing of x is needed.
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, -sin), None, None


def apply_rope(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of x ``[B, H, T, D]`` at positions ``start ..``,
    computed in fp32 and returned in x's dtype; saves only the ``[T, D]`` angle tables."""
    cos, sin = rope_angles(x.shape[-2], x.shape[-1], start, base, x.device)
    return _Rope.apply(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """The same rotation as plain torch ops (autograd keeps the fp32 copies)."""
    cos, sin = rope_angles(x.shape[-2], x.shape[-1], start, base, x.device)
    return _rotate(x, cos, sin)
