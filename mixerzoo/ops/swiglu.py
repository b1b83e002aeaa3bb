"""The SwiGLU activation ``silu(gate) * up``, and its fusion with the down projection.

Written as ``F.silu(g) * u``, autograd keeps silu(g) (a new ``[..., H]`` tensor) besides g
and u, and ``F.linear(F.silu(g) * u, W)`` keeps the product as well. Here the Functions keep
only their inputs, as passed (gate and up are usually the two halves of one projection
output, read through their row strides), and recompute the rest in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerzoo.ops.conv import wants_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; only the kernels need Triton
    triton = None

__all__ = ["silu_mul", "silu_mul_reference", "swiglu_linear"]

TILE = 4096  # elements a program: 32 per thread at 4 warps, whatever H is
MAX_BLOCK_H = 1024

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _silu_mul_fwd(g, u, out, N, H, sgr, sgh, sur, suh, BR: tl.constexpr, BH: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (r < N)[:, None] & (h < H)[None, :]
    gv = tl.load(g + r[:, None] * sgr + h[None, :] * sgh, mask=m, other=0.0).to(tl.float32)
    uv = tl.load(u + r[:, None] * sur + h[None, :] * suh, mask=m, other=0.0).to(tl.float32)
    y = gv * tl.sigmoid(gv) * uv
    tl.store(out + r[:, None] * H + h[None, :], y.to(out.dtype.element_ty), mask=m)


@_jit
def _silu_mul_bwd(g, u, do, dg, du, N, H, sgr, sgh, sur, suh, sdr, sdh, sdgr, sdur,
                  BR: tl.constexpr, BH: tl.constexpr, STORE_PROD: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (r < N)[:, None] & (h < H)[None, :]
    gv = tl.load(g + r[:, None] * sgr + h[None, :] * sgh, mask=m, other=0.0).to(tl.float32)
    uv = tl.load(u + r[:, None] * sur + h[None, :] * suh, mask=m, other=0.0).to(tl.float32)
    d_ptr = do + r[:, None] * sdr + h[None, :] * sdh
    dv = tl.load(d_ptr, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(gv)
    dgv = dv * uv * s * (1.0 + gv * (1.0 - s))
    tl.store(dg + r[:, None] * sdgr + h[None, :], dgv.to(dg.dtype.element_ty), mask=m)
    tl.store(du + r[:, None] * sdur + h[None, :], (dv * gv * s).to(du.dtype.element_ty), mask=m)
    if STORE_PROD:
        # the product goes where dout was: each element is read above, by this same thread
        tl.store(d_ptr, (gv * s * uv).to(do.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` as ``[N, H]``: a view whenever the leading dims share one row stride."""
    return t.reshape(-1, t.shape[-1])


def _blocks(N: int, H: int) -> tuple[int, int, tuple[int, int]]:
    bh = min(MAX_BLOCK_H, triton.next_power_of_2(H))
    br = max(1, TILE // bh)
    return br, bh, (triton.cdiv(N, br), triton.cdiv(H, bh))


def _fwd(gate, up, use_triton):
    if not use_triton:
        acc = torch.promote_types(gate.dtype, torch.float32)
        return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)
    g, u = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if out.numel():
        br, bh, grid = _blocks(*g.shape)
        _silu_mul_fwd[grid](g, u, out, *g.shape, *g.stride(), *u.stride(), BR=br, BH=bh)
    return out


def _bwd(gate, up, dout, dgate, dup, use_triton, store_prod=False):
    """Write dgate and dup (``[..., H]``, last dim contiguous) and, with ``store_prod``,
    overwrite dout with the recomputed ``silu(gate) * up``."""
    if not use_triton:
        acc = torch.promote_types(gate.dtype, torch.float32)
        g, u, d = gate.to(acc), up.to(acc), dout.to(acc)
        s = torch.sigmoid(g)
        dgate.copy_(d * u * s * (1 + g * (1 - s)))
        dup.copy_(d * g * s)
        if store_prod:
            dout.copy_(g * s * u)
        return
    g, u, d, dg, du = (_rows(t) for t in (gate, up, dout, dgate, dup))
    if g.numel():
        br, bh, grid = _blocks(*g.shape)
        _silu_mul_bwd[grid](g, u, d, dg, du, *g.shape, *g.stride(), *u.stride(), *d.stride(),
                            dg.stride(0), du.stride(0), BR=br, BH=bh, STORE_PROD=store_prod)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, use_triton):
        ctx.save_for_backward(gate, up)
        ctx.use_triton = use_triton
        with torch.autocast(gate.device.type, enabled=False):
            return _fwd(gate, up, use_triton)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        dup = torch.empty_like(up, memory_format=torch.contiguous_format)
        with torch.autocast(gate.device.type, enabled=False):
            _bwd(gate, up, dout, dgate, dup, ctx.use_triton)
        return dgate, dup, None


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, use_triton):
        ctx.save_for_backward(gate_up, weight)
        ctx.use_triton = use_triton
        with torch.autocast(gate_up.device.type, enabled=False):
            prod = _fwd(*gate_up.chunk(2, dim=-1), use_triton)
            return F.linear(prod, weight.to(gate_up.dtype))

    @staticmethod
    def backward(ctx, dout):
        gate_up, weight = ctx.saved_tensors
        with torch.autocast(gate_up.device.type, enabled=False):
            w = weight.to(gate_up.dtype)
            dout = dout.to(gate_up.dtype)
            dprod = dout @ w  # [..., H], then overwritten with the product for weight's grad
            dgu = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
            want_dw = ctx.needs_input_grad[1]
            _bwd(*gate_up.chunk(2, dim=-1), dprod, *dgu.chunk(2, dim=-1), ctx.use_triton, store_prod=want_dw)
            dw = None
            if want_dw:
                dw = (_rows(dout).t() @ _rows(dprod)).to(weight.dtype)
        return dgu, dw, None


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for gate, up ``[..., H]`` of one shape and dtype (views are fine).

    Computed in fp32, returned as a new contiguous tensor in their dtype; saves gate and up.
    ``backend``: ``"auto"`` (Triton for CUDA tensors), ``"triton"``, ``"torch"``.
    """
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape [..., H]")
    if gate.dtype != up.dtype or not gate.is_floating_point() or gate.device != up.device:
        raise ValueError(f"silu_mul: gate ({gate.dtype}, {gate.device}) and up ({up.dtype}, {up.device}) "
                         "must be floating tensors of one dtype on one device")
    return _SiluMul.apply(gate, up, wants_triton(backend, gate))


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_linear(gate_up: torch.Tensor, down_weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``F.linear(silu(gate) * up, down_weight)`` without keeping the ``[..., H]`` product.

    Args:
        gate_up: ``[..., 2H]``, gate the first half, up the second.
        down_weight: ``[D, H]``. The matmuls run in gate_up's dtype, the weight cast to it (as
            autocast would for bf16 gate_up and an fp32 weight); its grad keeps its own dtype.

    Returns ``[..., D]`` in gate_up's dtype. Saves gate_up and down_weight only.
    """
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_linear: gate_up must be [..., 2H], got shape {tuple(gate_up.shape)}")
    H = gate_up.shape[-1] // 2
    if down_weight.dim() != 2 or down_weight.shape[1] != H:
        raise ValueError(f"swiglu_linear: down_weight must be [D, H={H}], got shape {tuple(down_weight.shape)}")
    if not (gate_up.is_floating_point() and down_weight.is_floating_point()) or gate_up.device != down_weight.device:
        raise ValueError("swiglu_linear: gate_up and down_weight must be floating tensors on one device")
    return _SwiGLULinear.apply(gate_up, down_weight, wants_triton(backend, gate_up))
