"""Point-wise steps of the mixers that are computed in fp32 but kept in the activation dtype.

Written as plain torch code, ``(x.float() * dt).to(bf16)`` makes autograd keep the fp32
upcast of x for the backward: 4 bytes an element on top of the bf16 x that is alive anyway.
Each Function here computes in fp32 like that code, returns the activation dtype and saves
only tensors that exist already (or none), recomputing the rest in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch code below runs without it
    triton = None


# --- y = add + x · s, with s one scalar per row [B, T, H] (Mamba-2's dt) or per head [H] (D) -------

if triton is not None:
    @triton.jit
    def _scale_fwd(X, S, A, Y, R, H, sxt, sxh, sat, sah, P: tl.constexpr, BR: tl.constexpr,
                   PER_ROW: tl.constexpr, HAS_ADD: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.arange(0, P)
        mask = (rows < R)[:, None]
        t, h = rows // H, rows % H
        x = tl.load(X + (t * sxt + h * sxh)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + (rows if PER_ROW else h), mask=rows < R, other=0.0).to(tl.float32)
        y = x * s[:, None]
        if HAS_ADD:
            y += tl.load(A + (t * sat + h * sah)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows[:, None] * P + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_bwd(DY, X, S, DX, DS, R, H, sxt, sxh, P: tl.constexpr, BR: tl.constexpr, PER_ROW: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.arange(0, P)
        mask = (rows < R)[:, None]
        t, h = rows // H, rows % H
        dy = tl.load(DY + rows[:, None] * P + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + (t * sxt + h * sxh)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + (rows if PER_ROW else h), mask=rows < R, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * P + cols[None, :], (dy * s[:, None]).to(DX.dtype.element_ty), mask=mask)
        tl.store(DS + rows, tl.sum(dy * x, axis=1), mask=rows < R)


def _heads_view(x: torch.Tensor):
    """(token stride, head stride) of x ``[B, T, H, P]`` read as rows ``(b, t, h)``, or None
    where B and T do not merge into one token stride or P is not contiguous."""
    B, T, H, P = x.shape
    if x.stride(3) != 1 or (B > 1 and x.stride(0) != T * x.stride(1)):
        return None
    return x.stride(1), x.stride(2)


def _use_kernel(backend: str, *ts: torch.Tensor) -> bool:
    """Whether the Triton kernels run: "auto" on CUDA where the layout allows, "triton" always
    (the CPU tests run them in the interpreter), "torch" never."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'triton', 'torch')")
    x = ts[0]
    P = x.shape[-1]
    fits = (triton is not None and x.dtype != torch.float64 and P & (P - 1) == 0 and P <= 256
            and all(t is None or _heads_view(t) is not None for t in ts))
    if backend == "triton" and not fits:
        raise RuntimeError("scale_rows backend='triton' needs triton, a power-of-two P <= 256 and [B, T, H, P] "
                           "tensors whose P is contiguous")
    return backend == "triton" or (backend == "auto" and fits and x.is_cuda)


def scale_rows_forward(x, s, add=None, backend="auto") -> torch.Tensor:
    """The forward of :func:`scale_rows` without autograd (for ops that recompute it)."""
    per_row = s.dim() == 3
    if not _use_kernel(backend, x, add):
        y = x.float() * (s[..., None] if per_row else s[:, None].float())
        return (y + add.float() if add is not None else y).to(x.dtype)
    B, T, H, P = x.shape
    R = B * T * H
    y = torch.empty(B, T, H, P, device=x.device, dtype=x.dtype)
    sxt, sxh = _heads_view(x)
    sat, sah = _heads_view(add) if add is not None else (0, 0)
    BR = max(1, 4096 // P)
    _scale_fwd[(triton.cdiv(R, BR),)](x, s.contiguous(), x if add is None else add, y, R, H, sxt, sxh, sat, sah,
                                      P=P, BR=BR, PER_ROW=per_row, HAS_ADD=add is not None)
    return y


def scale_rows_backward(dy, x, s, backend="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, ds)`` of ``y = add + x · s`` (ds in fp32, s's shape)."""
    per_row = s.dim() == 3
    dy = dy.contiguous()
    if not _use_kernel(backend, x, dy):
        dyf = dy.float()
        dx = (dyf * (s[..., None] if per_row else s[:, None].float())).to(x.dtype)
        ds = (dyf * x.float()).sum(-1)
    else:
        B, T, H, P = x.shape
        R = B * T * H
        dx = torch.empty(B, T, H, P, device=x.device, dtype=x.dtype)
        ds = torch.empty(B, T, H, device=x.device, dtype=torch.float32)
        sxt, sxh = _heads_view(x)
        BR = max(1, 4096 // P)
        _scale_bwd[(triton.cdiv(R, BR),)](dy, x, s.contiguous(), dx, ds, R, H, sxt, sxh, P=P, BR=BR, PER_ROW=per_row)
    return dx, (ds if per_row else ds.flatten(0, 1).sum(0))


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, add, backend):
        ctx.backend = backend
        ctx.save_for_backward(x, s)
        return scale_rows_forward(x, s, add, backend)

    @staticmethod
    def backward(ctx, dy):
        x, s = ctx.saved_tensors
        dx, ds = scale_rows_backward(dy, x, s, ctx.backend)
        return dx, ds.to(s.dtype), dy if ctx.needs_input_grad[2] else None, None


def scale_rows(x: torch.Tensor, s: torch.Tensor, add: torch.Tensor | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """``add + x · s`` for x ``[B, T, H, P]`` with s ``[B, T, H]`` (per row) or ``[H]`` (per head),
    computed in fp32 and returned in x's dtype; add (``[B, T, H, P]``) is optional. Saves only
    x and s (x may be a view into a wider tensor: it is read in place). One Triton kernel each
    way on CUDA; torch ops elsewhere."""
    if x.dim() != 4 or s.shape not in (x.shape[:3], x.shape[2:3]):
        raise ValueError(f"scale_rows: x must be [B, T, H, P] and s [B, T, H] or [H]; got {tuple(x.shape)}, "
                         f"{tuple(s.shape)}")
    if add is not None and add.shape != x.shape:
        raise ValueError(f"scale_rows: add {tuple(add.shape)} must have x's shape {tuple(x.shape)}")
    return _ScaleRows.apply(x, s, add, backend)


def mul_dt(x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, P] · dt [B, T, H]`` in fp32, returned in x's dtype (Mamba-2's ``v = x·dt``)."""
    if x.shape[:-1] != dt.shape:
        raise ValueError(f"mul_dt: x {tuple(x.shape)} and dt {tuple(dt.shape)} must agree up to x's last dim")
    return scale_rows(x, dt)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        y = F.softplus(x.float()).to(dtype)
        # softplus' = sigmoid(x) = 1 - exp(-softplus(x)): the output is enough for backward,
        # and the op it feeds keeps that same tensor anyway
        ctx.save_for_backward(y)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return (dy.float() * -torch.expm1(-y.float())).to(ctx.x_dtype), None


def softplus(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softplus(x) in fp32, returned in ``dtype`` (default x's); saves only its output."""
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
