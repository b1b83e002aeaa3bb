"""Fused RMSNorm and Mamba-2's gated RMSNorm that keep only their inputs for backward.

The plain torch norms let autograd keep several fp32 copies of ``[B, T, D]`` per norm. These
save the inputs in their own dtype plus one fp32 ``rstd`` per row (per row and group for the
gated norm) and recompute the rest in backward. Both norms are one op: RMSNorm is the gated
norm with no gate and a single group of ``D`` channels.

Triton layout: rows are ``[..., D]`` flattened to ``[R, D]`` with a row stride and unit
channel stride. Forward runs one program per (row, group). Backward runs a fixed grid of
about ``8 × SMs`` programs in all, each walking a contiguous block of rows and keeping its
share of ``dweight`` in registers; the ``[programs, D]`` fp32 partials are summed by torch,
so the result is deterministic and needs no atomics.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no Triton
    triton = None

__all__ = ["gated_rms_norm", "gated_rms_norm_reference", "rms_norm", "rms_norm_reference"]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_BLOCK = 65536  # larger groups would live mostly in local memory: the torch path is better


def rms_norm_reference(x, weight, eps=1e-5, out_dtype=None):
    """``x * rsqrt(mean(x²) + eps) * weight`` over the last dim, by plain torch ops."""
    # fp32 at least: bf16 squares lose too many bits for a stable mean
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return y.to(out_dtype or x.dtype)


def gated_rms_norm_reference(y, z, weight, group_size, norm_before_gate=False, eps=1e-5, out_dtype=None):
    """Mamba-2's gated RMSNorm over groups of ``group_size`` channels, by plain torch ops."""
    ct = torch.promote_types(y.dtype, torch.float32)
    yf, gate = y.to(ct), F.silu(z.to(ct))
    if not norm_before_gate:
        yf = yf * gate
    yg = yf.unflatten(-1, (-1, group_size))  # [..., G, group_size]
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    out = yg.flatten(-2) * weight.to(ct)
    if norm_before_gate:
        out = out * gate
    return out.to(out_dtype or y.dtype)


if triton is not None:

    @triton.jit
    def _norm_fwd(X, Z, W, OUT, RSTD, sx, sz, so, GS, G, eps,
                  BLOCK: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
        # int64 offsets: R × D passes 2**31 at realistic batch sizes
        row, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < GS
        ch = g * GS + cols
        x = tl.load(X + row * sx + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + row * sz + ch, mask=mask, other=0.0).to(tl.float32)
            gate = z * tl.sigmoid(z)
            if not NORM_BEFORE_GATE:
                x = x * gate
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / GS + eps)
        tl.store(RSTD + row * G + g, rstd)
        out = x * rstd * tl.load(W + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            if NORM_BEFORE_GATE:
                out = out * gate
        tl.store(OUT + row * so + ch, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_bwd(X, Z, W, RSTD, DO, DX, DZ, DWP, sx, sz, sdo, R, ROWS_PER_PROG, GS, G, D,
                  BLOCK: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
        pid, g = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < GS
        ch = g * GS + cols
        w = tl.load(W + ch, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        row_start = pid.to(tl.int64) * ROWS_PER_PROG
        for i in range(0, tl.minimum(ROWS_PER_PROG, R - pid * ROWS_PER_PROG)):
            row = row_start + i
            x = tl.load(X + row * sx + ch, mask=mask, other=0.0).to(tl.float32)
            do = tl.load(DO + row * sdo + ch, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row * G + g)
            if HAS_Z:
                z = tl.load(Z + row * sz + ch, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                gate = z * sig
                dgate = sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
                if NORM_BEFORE_GATE:
                    n = x * rstd
                    dz = do * n * w * dgate
                    do = do * gate
                else:
                    s = x * gate  # the normalised input
                    n = s * rstd
            else:
                n = x * rstd
            dw += do * n
            dn = do * w
            # d/dx of x·rstd(x): rstd · (dn − n · mean(dn · n)), per group
            dx = (dn - n * (tl.sum(dn * n, axis=0) / GS)) * rstd
            if HAS_Z:
                if not NORM_BEFORE_GATE:
                    dz = dx * x * dgate
                    dx = dx * gate
                tl.store(DZ + row * D + ch, dz.to(DZ.dtype.element_ty), mask=mask)
            tl.store(DX + row * D + ch, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DWP + pid.to(tl.int64) * D + ch, dw, mask=mask)


def _launch_args(gs):
    # 8 channels a thread: compiled for sm_90, the gated backward needs ~14 registers per
    # channel a thread, so this stays clear of spills up to groups of 4096 (8192 spills a little)
    block = triton.next_power_of_2(gs)
    return block, min(32, max(4, block // 256))


def _triton_fwd(x, z, w, gs, nbg, eps, out_dtype):
    R, D = x.shape
    G = D // gs
    out = torch.empty(R, D, dtype=out_dtype, device=x.device)
    rstd = torch.empty(R, G, dtype=torch.float32, device=x.device)
    block, warps = _launch_args(gs)
    zz = x if z is None else z  # never read when HAS_Z is off
    _norm_fwd[(R, G)](x, zz, w, out, rstd, x.stride(0), zz.stride(0), out.stride(0), gs, G, eps,
                      BLOCK=block, HAS_Z=z is not None, NORM_BEFORE_GATE=nbg, num_warps=warps)
    return out, rstd


def _triton_bwd(x, z, w, rstd, do, gs, nbg):
    R, D = x.shape
    G = D // gs
    # enough programs to fill the GPU twice over whatever G is; few under the interpreter so
    # that every program walks several rows there too
    if x.is_cuda:
        target = max(1, triton.cdiv(8 * torch.cuda.get_device_properties(x.device).multi_processor_count, G))
    else:
        target = 3
    rows_per_prog = triton.cdiv(R, min(R, target))
    nprog = triton.cdiv(R, rows_per_prog)
    dx = torch.empty(R, D, dtype=x.dtype, device=x.device)
    dz = None if z is None else torch.empty(R, D, dtype=z.dtype, device=x.device)
    dwp = torch.empty(nprog, D, dtype=torch.float32, device=x.device)
    block, warps = _launch_args(gs)
    zz, dzz = (x, dx) if z is None else (z, dz)
    _norm_bwd[(nprog, G)](x, zz, w, rstd, do, dx, dzz, dwp, x.stride(0), zz.stride(0), do.stride(0),
                          R, rows_per_prog, gs, G, D,
                          BLOCK=block, HAS_Z=z is not None, NORM_BEFORE_GATE=nbg, num_warps=warps)
    return dx, dz, dwp.sum(0)


def _torch_fwd(x, z, w, gs, nbg, eps, out_dtype):
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    if z is not None:
        gate = F.silu(z.to(ct))
        if not nbg:
            xf = xf * gate
    xg = xf.unflatten(-1, (-1, gs))  # [R, G, gs]
    rstd = torch.rsqrt(xg.pow(2).mean(-1) + eps)  # [R, G]
    out = (xg * rstd[..., None]).flatten(-2) * w.to(ct)
    if z is not None and nbg:
        out = out * gate
    return out.to(out_dtype), rstd


def _torch_bwd(x, z, w, rstd, do, gs, nbg):
    ct = rstd.dtype
    xf, do, dz = x.to(ct), do.to(ct), None
    if z is not None:
        zf = z.to(ct)
        sig = torch.sigmoid(zf)
        gate, dgate = zf * sig, sig * (1 + zf * (1 - sig))
        if nbg:
            n = xf.unflatten(-1, (-1, gs)) * rstd[..., None]
            dz = (do * n.flatten(-2) * w.to(ct) * dgate).to(z.dtype)
            do = do * gate
        else:
            n = (xf * gate).unflatten(-1, (-1, gs)) * rstd[..., None]
    else:
        n = xf.unflatten(-1, (-1, gs)) * rstd[..., None]
    n = n.flatten(-2)  # [R, D]
    dw = (do * n).sum(0)
    dn = (do * w.to(ct)).unflatten(-1, (-1, gs))
    ng = n.unflatten(-1, (-1, gs))
    dx = ((dn - ng * (dn * ng).mean(-1, keepdim=True)) * rstd[..., None]).flatten(-2)
    if z is not None and not nbg:
        dz = (dx * xf * dgate).to(z.dtype)
        dx = dx * gate
    return dx.to(x.dtype), dz, dw


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, gs, nbg, eps, out_dtype, use_triton):
        shape, weight = x.shape, weight.contiguous()
        x2, z2 = _rows(x), None if z is None else _rows(z)
        if x2.numel() == 0:
            out, rstd = x2.new_empty(x2.shape, dtype=out_dtype), x2.new_empty(x2.shape[0], 0, dtype=torch.float32)
        else:
            out, rstd = (_triton_fwd if use_triton else _torch_fwd)(x2, z2, weight, gs, nbg, eps, out_dtype)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.conf = (shape, gs, nbg, use_triton)
        return out.view(shape)

    @staticmethod
    def backward(ctx, do):
        x, z, weight, rstd = ctx.saved_tensors
        shape, gs, nbg, use_triton = ctx.conf
        if x.numel() == 0:
            dx, dz, dw = torch.zeros_like(x), None if z is None else torch.zeros_like(z), torch.zeros_like(weight)
        else:
            dx, dz, dw = (_triton_bwd if use_triton else _torch_bwd)(x, z, weight, rstd, _rows(do), gs, nbg)
        dz = None if dz is None else dz.view(shape)
        return dx.view(shape), dz, dw.to(weight.dtype), None, None, None, None, None


class _NormLinear(torch.autograd.Function):
    """The gated norm followed by a projection, without keeping the norm's output: backward
    rebuilds it from the saved inputs and rstd (one more cheap pass) for the projection's
    weight gradient. Saves x, z, the two weights and rstd."""

    @staticmethod
    def forward(ctx, x, z, weight, proj_w, gs, nbg, eps, use_triton, out_dtype):
        shape, weight = x.shape, weight.contiguous()
        x2, z2 = _rows(x), None if z is None else _rows(z)
        out, rstd = (_triton_fwd if use_triton else _torch_fwd)(x2, z2, weight, gs, nbg, eps, out_dtype)
        y = out @ proj_w.to(out.dtype).t()  # what autocast would run: the activation dtype
        ctx.save_for_backward(x2, z2, weight, rstd, proj_w)
        ctx.conf = (shape, gs, nbg, eps, use_triton, out_dtype)
        return y.view(*shape[:-1], proj_w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, z, weight, rstd, proj_w = ctx.saved_tensors
        shape, gs, nbg, eps, use_triton, out_dtype = ctx.conf
        n, _ = (_triton_fwd if use_triton else _torch_fwd)(x, z, weight, gs, nbg, eps, out_dtype)
        dy = _rows(dy).to(n.dtype)
        dproj = (dy.t() @ n).to(proj_w.dtype)
        dn = dy @ proj_w.to(n.dtype)
        dx, dz, dw = (_triton_bwd if use_triton else _torch_bwd)(x, z, weight, rstd, dn, gs, nbg)
        dz = None if dz is None else dz.view(shape)
        return dx.view(shape), dz, dw.to(weight.dtype), dproj, None, None, None, None, None


def rms_norm_linear(x, weight, proj_weight, eps=1e-5, *, out_dtype=None, backend="auto"):
    """``F.linear(rms_norm(x, weight, eps, out_dtype=out_dtype), proj_weight)`` without keeping
    the ``[..., D]`` norm output for backward; the product runs in ``out_dtype`` (default x's:
    pass the autocast dtype under autocast). Returns ``[..., P]``."""
    gs = max(x.shape[-1], 1) if x.dim() else 1
    use_triton = _check(x, weight, gs, eps, out_dtype, backend)
    if proj_weight.dim() != 2 or proj_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"proj_weight must be [P, {x.shape[-1]}], got {list(proj_weight.shape)}")
    out_dtype = out_dtype or x.dtype
    if x.numel() == 0:
        return F.linear(rms_norm(x, weight, eps, out_dtype=out_dtype, backend=backend), proj_weight.to(out_dtype))
    return _NormLinear.apply(x, None, weight, proj_weight, gs, False, float(eps), use_triton, out_dtype)


def gated_rms_norm_linear(y, z, weight, proj_weight, *, group_size, norm_before_gate=False, eps=1e-5,
                          backend="auto"):
    """``F.linear(gated_rms_norm(y, z, weight, ...), proj_weight)`` (Mamba-2's norm and
    out_proj) without keeping the ``[..., D]`` norm output for backward.

    ``y``, ``z`` ``[..., D]``, ``proj_weight`` ``[P, D]`` (cast to y's dtype for the product, as
    autocast does). Returns ``[..., P]`` in y's dtype.
    """
    use_triton = _check(y, weight, group_size, eps, None, backend, z=z)
    if proj_weight.dim() != 2 or proj_weight.shape[1] != y.shape[-1]:
        raise ValueError(f"proj_weight must be [P, {y.shape[-1]}], got {list(proj_weight.shape)}")
    if y.numel() == 0:
        return F.linear(gated_rms_norm(y, z, weight, group_size=group_size, norm_before_gate=norm_before_gate,
                                       eps=eps, backend=backend), proj_weight.to(y.dtype))
    return _NormLinear.apply(y, z, weight, proj_weight, group_size, bool(norm_before_gate), float(eps), use_triton,
                             y.dtype)


def _rows(t):
    """``t`` as ``[R, D]`` with unit channel stride: a view where one exists, else a copy."""
    t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # -1 is ambiguous for D = 0
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _triton_usable(device):
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _check(x, weight, gs, eps, out_dtype, backend, z=None):
    for name, t in (("input", x), ("z", z), ("weight", weight)):
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be a float tensor (one of {_DTYPES}), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("input must have a channel dim [..., D]")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [{D}] for input [..., {D}], got {list(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have y's shape {list(x.shape)}, got {list(z.shape)}")
    if any(t is not None and t.device != x.device for t in (z, weight)):
        raise ValueError(f"inputs must share one device, got {x.device}, {weight.device}")
    if not isinstance(gs, int) or gs <= 0 or (D > 0 and D % gs):
        raise ValueError(f"group_size={gs!r} must be a positive int dividing D={D}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be a float dtype, got {out_dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return False
    usable = _triton_usable(x.device)
    if backend == "auto" and x.device.type != "cuda":
        return False  # the interpreter only where a test asks for backend="triton"
    fits = usable and gs <= _MAX_BLOCK and not any(t is not None and t.dtype == torch.float64 for t in (x, z, weight))
    if backend == "triton" and not fits:
        raise RuntimeError("the Triton norms need triton and a CUDA tensor (or TRITON_INTERPRET=1)" if not usable else
                           f"the Triton norms take fp16/bf16/fp32 and groups of <= {_MAX_BLOCK} channels; "
                           "use backend='torch'")
    return fits


def rms_norm(x, weight, eps=1e-5, *, out_dtype=None, backend="auto"):
    """RMSNorm over the last dim: ``x * rsqrt(mean(x²) + eps) * weight``, computed in fp32.

    ``x`` ``[..., D]`` (any leading strides), ``weight`` ``[D]``. Returns ``[..., D]`` in
    ``out_dtype`` (default x's dtype; pass the autocast dtype under autocast). Saves only
    x, weight and one fp32 rstd per row for backward; dx comes in x's dtype.
    """
    gs = max(x.shape[-1], 1) if x.dim() else 1  # one group of D channels (D = 0 has no rows to norm)
    use_triton = _check(x, weight, gs, eps, out_dtype, backend)
    return _Norm.apply(x, None, weight, gs, False, float(eps), out_dtype or x.dtype, use_triton)


def gated_rms_norm(y, z, weight, *, group_size, norm_before_gate=False, eps=1e-5, out_dtype=None,
                   backend="auto"):
    """Mamba-2's gated RMSNorm (as ``GatedRMSNorm`` in ``mixers/mamba2.py``), computed in fp32.

    ``norm_before_gate=False`` normalises ``y * silu(z)`` per group of ``group_size``
    channels and scales by ``weight``; ``True`` normalises y, scales, then multiplies by
    ``silu(z)``. ``y``, ``z`` ``[..., D]``, ``weight`` ``[D]``, ``D % group_size == 0``.
    Returns ``[..., D]`` in ``out_dtype`` (default y's dtype). Saves only y, z, weight and
    one fp32 rstd per row and group.
    """
    use_triton = _check(y, weight, group_size, eps, out_dtype, backend, z=z)
    return _Norm.apply(y, z, weight, group_size, bool(norm_before_gate), float(eps), out_dtype or y.dtype,
                       use_triton)
