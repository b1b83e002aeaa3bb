"""Mamba-2's short causal depthwise convolution + SiLU, memory-lean.

``out[b, t, c] = act(bias[c] + Σ_k weight[c, k] · x[b, t − W + 1 + k, c])``, with x = 0 before
t = 0 (a fresh sequence). The plain torch code (``causal_conv1d_reference``) makes autograd keep
a padded ``[B, C, T + W − 1]`` copy of x for the conv and the ``[B, C, T]`` pre-activation for
the SiLU. Here autograd keeps x as passed (usually a column slice of in_proj's output, read
through its strides), the weight and the bias; backward recomputes the pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from mixerzoo.ops.loglinear.api import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; only the kernels need Triton
    triton = None

__all__ = ["causal_conv1d", "causal_conv1d_reference"]

BACKENDS = ("auto", "torch", "triton")
ACTIVATIONS = ("silu", None)
BLOCK_T = 32  # time steps per program: the W − 1 halo rows re-read are then at most 1/10 extra
FWD_BLOCK_C = 128  # 128 contiguous channels a row: 256-byte bf16 loads
BWD_BLOCK_C = 64  # the backward holds more tiles live (dout, pre, dx), so narrower

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _conv_fwd(x, w, bias, out, T, C, sxb, sxt, sxc, swc, swk,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    xb = x + i_b * sxb + c[None, :] * sxc
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    # Each shifted tile overlaps the last in all but one row, so after the first the loads
    # are cache hits: x leaves DRAM about once.
    for k in tl.static_range(W):
        ts = t - (W - 1 - k)
        m = ((ts >= 0) & (ts < T))[:, None] & cm[None, :]
        xk = tl.load(xb + ts.to(tl.int64)[:, None] * sxt, mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w + c * swc + k * swk, mask=cm, other=0.0).to(tl.float32)
        acc += wk[None, :] * xk
    if SILU:
        acc = acc * tl.sigmoid(acc)
    o = out + (i_b * T + t.to(tl.int64))[:, None] * C + c[None, :]
    tl.store(o, acc.to(out.dtype.element_ty), mask=(t < T)[:, None] & cm[None, :])


@_jit
def _conv_bwd(x, w, bias, dout, dx, dw_part, db_part, T, C, NT,
              sxb, sxt, sxc, swc, swk, sdb, sdt, sdc,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    cm = c < C
    xb = x + i_b * sxb + c[None, :] * sxc
    b0 = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        b0 = tl.load(bias + c, mask=cm, other=0.0).to(tl.float32)
    dx_acc = tl.zeros([BT, BC], dtype=tl.float32)
    # dx[t] needs dpre at t .. t + W − 1, so the tile's pre-activation is recomputed at W shifts;
    # rows past T read dout = 0 and so contribute nothing.
    for j in tl.static_range(W):
        tj = t + j
        pre = tl.zeros([BT, BC], dtype=tl.float32) + b0[None, :]
        for k in tl.static_range(W):
            ts = tj - (W - 1 - k)
            m = ((ts >= 0) & (ts < T))[:, None] & cm[None, :]
            xk = tl.load(xb + ts.to(tl.int64)[:, None] * sxt, mask=m, other=0.0).to(tl.float32)
            pre += tl.load(w + c * swc + k * swk, mask=cm, other=0.0).to(tl.float32)[None, :] * xk
        dm = (tj < T)[:, None] & cm[None, :]
        d_ptr = dout + i_b * sdb + tj.to(tl.int64)[:, None] * sdt + c[None, :] * sdc
        dpre = tl.load(d_ptr, mask=dm, other=0.0).to(tl.float32)
        if SILU:
            s = tl.sigmoid(pre)
            dpre = dpre * s * (1.0 + pre * (1.0 - s))
        w_j = tl.load(w + c * swc + (W - 1 - j) * swk, mask=cm, other=0.0).to(tl.float32)
        dx_acc += w_j[None, :] * dpre
        if j == 0:
            # this program's share of the (B, T) sums, reduced later by torch in a fixed order
            part = i_b * NT + i_t
            if HAS_BIAS:
                tl.store(db_part + part * C + c, tl.sum(dpre, axis=0), mask=cm)
            for k in tl.static_range(W):
                ts = t - (W - 1 - k)
                m = ((ts >= 0) & (ts < T))[:, None] & cm[None, :]
                xk = tl.load(xb + ts.to(tl.int64)[:, None] * sxt, mask=m, other=0.0).to(tl.float32)
                tl.store(dw_part + (part * W + k) * C + c, tl.sum(dpre * xk, axis=0), mask=cm)
    o = dx + (i_b * T + t.to(tl.int64))[:, None] * C + c[None, :]
    tl.store(o, dx_acc.to(dx.dtype.element_ty), mask=(t < T)[:, None] & cm[None, :])


def _fwd_triton(x, weight, bias, silu):
    B, T, C = x.shape
    out = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    bc = min(FWD_BLOCK_C, triton.next_power_of_2(C))
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(C, bc), B)
    _conv_fwd[grid](x, weight, weight if bias is None else bias.contiguous(), out, T, C, *x.stride(),
                    *weight.stride(), W=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu,
                    BT=BLOCK_T, BC=bc)
    return out


def _bwd_triton(x, weight, bias, dout, silu):
    B, T, C = x.shape
    W, nt = weight.shape[1], triton.cdiv(T, BLOCK_T)
    dx = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    dw_part = torch.empty((B * nt, W, C), device=x.device, dtype=torch.float32)
    db_part = torch.empty((B * nt, C), device=x.device, dtype=torch.float32) if bias is not None else dw_part
    bc = min(BWD_BLOCK_C, triton.next_power_of_2(C))
    _conv_bwd[(nt, triton.cdiv(C, bc), B)](
        x, weight, weight if bias is None else bias.contiguous(), dout, dx, dw_part, db_part, T, C, nt,
        *x.stride(), *weight.stride(), *dout.stride(),
        W=W, HAS_BIAS=bias is not None, SILU=silu, BT=BLOCK_T, BC=bc)
    db = db_part.sum(0) if bias is not None else None
    return dx, dw_part.sum(0).t().contiguous(), db


def _pre_torch(x, weight, bias):
    """The pre-activation ``[B, C, T]`` in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xt = F.pad(rearrange(x.to(acc), "b t c -> b c t"), (weight.shape[1] - 1, 0))
    b = None if bias is None else bias.to(acc)
    return F.conv1d(xt, weight.to(acc)[:, None, :], b, groups=x.shape[-1]), xt


def _fwd_torch(x, weight, bias, silu):
    pre, _ = _pre_torch(x, weight, bias)
    out = F.silu(pre) if silu else pre
    return rearrange(out, "b c t -> b t c").contiguous().to(x.dtype)


def _bwd_torch(x, weight, bias, dout, silu):
    pre, xp = _pre_torch(x, weight, bias)
    T, W = x.shape[1], weight.shape[1]
    dpre = rearrange(dout.to(pre.dtype), "b t c -> b c t")
    if silu:
        s = torch.sigmoid(pre)
        dpre = dpre * s * (1 + pre * (1 - s))
    # dx[t] = Σ_k w[k] · dpre[t + W − 1 − k]: a causal conv run backwards in time
    dx = F.conv1d(F.pad(dpre, (0, W - 1)), weight.to(pre.dtype).flip(-1)[:, None, :], groups=x.shape[-1])
    dw = torch.stack([(dpre * xp[..., k:k + T]).sum((0, 2)) for k in range(W)], dim=1)
    db = dpre.sum((0, 2)) if bias is not None else None
    return rearrange(dx, "b c t -> b t c").contiguous().to(x.dtype), dw, db


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, use_triton):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.use_triton = silu, use_triton
        # fp32 on purpose: autocast would otherwise run the torch path's conv in bf16
        with torch.autocast(x.device.type, enabled=False):
            return (_fwd_triton if use_triton else _fwd_torch)(x, weight, bias, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx, dw, db = (_bwd_triton if ctx.use_triton else _bwd_torch)(x, weight, bias, dout, ctx.silu)
        return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype), None, None


def wants_triton(backend: str, x: torch.Tensor) -> bool:
    """Validate ``backend`` and say whether the Triton kernels run for tensors like x."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    available = triton is not None and triton_available(x.device)
    if backend == "triton" and not available:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1) and triton")
    # "auto" takes the kernels on CUDA only: the interpreter is for tests that ask for it, and
    # fp64 stays on torch because the kernels compute in fp32
    return backend == "triton" or (backend == "auto" and available and x.is_cuda and x.dtype != torch.float64)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  activation: str | None = "silu", backend: str = "auto") -> torch.Tensor:
    """Causal depthwise conv + activation over ``x [B, T, C]`` from a fresh (zero) state.

    Args:
        x: ``[B, T, C]``, any strides (a slice of a wider projection is read in place).
        weight: ``[C, W]`` (``nn.Conv1d(C, C, W, groups=C).weight[:, 0, :]``), may be fp32 with
            bf16 x, as under autocast.
        bias: ``[C]`` or None.
        activation: ``"silu"`` or None.
        backend: ``"auto"`` (Triton for CUDA tensors, else torch),
            ``"triton"`` or ``"torch"``.

    Returns a new contiguous ``[B, T, C]`` tensor in x's dtype, computed in fp32. Gradients
    come back in each input's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [C={C}, W], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"causal_conv1d: bias must be [C={C}], got shape {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation={activation!r} is not one of {ACTIVATIONS}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (not t.is_floating_point() or t.device != x.device):
            raise ValueError(f"causal_conv1d: {name} must be a floating tensor on {x.device}")
    use_triton = wants_triton(backend, x)
    return _CausalConv1d.apply(x, weight, bias, activation == "silu", use_triton)


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = "silu") -> torch.Tensor:
    """The plain torch ops (Mamba2._conv without a state): x, weight, bias ``[B, T, C]``, ``[C, W]``, ``[C]``."""
    xt = F.pad(rearrange(x, "b t c -> b c t"), (weight.shape[1] - 1, 0))
    out = rearrange(F.conv1d(xt, weight[:, None, :], bias, groups=x.shape[-1]), "b c t -> b t c")
    return F.silu(out) if activation == "silu" else out
