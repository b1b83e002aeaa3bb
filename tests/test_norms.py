"""The fused RMSNorm and gated RMSNorm against their plain-torch references.

Both backends run everywhere: on a CPU machine "triton" is the interpreter (conftest sets
TRITON_INTERPRET=1) at tiny sizes; with a GPU the same tests compile the kernels on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mixerzoo.ops.norms import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference
from tests.utils import TOLERANCE, assert_close, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "torch")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def grads(fn, leaves, do, view=lambda *t: t):
    """Output of ``fn(*view(*leaves))`` and the gradients of ``(out * do).sum()`` for each leaf."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*view(*leaves))
    return out, torch.autograd.grad(out, leaves, do)


def check(fused, ref, leaves, names, view=lambda *t: t, do_view=lambda t: t):
    """Fused vs reference on the same inputs: output and every gradient, dtypes included."""
    out_ref = ref(*view(*leaves))
    do = do_view(torch.randn(out_ref.shape, device=DEVICE, dtype=out_ref.dtype))
    out, gs = grads(fused, leaves, do, view)
    out_ref, gs_ref = grads(ref, leaves, do, view)
    assert out.dtype == out_ref.dtype, f"out: dtype {out.dtype} != {out_ref.dtype}"
    assert_close("out", out_ref, out, TOLERANCE[out_ref.dtype])
    for n, g, g_ref in zip(names, gs, gs_ref):
        assert g.dtype == g_ref.dtype, f"{n}: dtype {g.dtype} != {g_ref.dtype}"
        # a gradient in bf16 is rounded once at the end; one in fp32 (dweight, or dx of an
        # fp32 input whose output was bf16) only sees the same bf16 dout in both paths
        assert_close(n, g_ref, g, TOLERANCE[g_ref.dtype])


def randn(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


RMS_CASES = [
    # shape, x dtype, out dtype
    ((2, 7, 48), F32, None),
    ((1, 100), F32, None),  # one row, D not a power of two
    ((3, 5, 64), BF16, None),
    ((2, 9, 100), F32, BF16),  # the autocast case: fp32 residual stream, bf16 out
    ((1, 3, 40), F16, None),
    ((4, 1024), BF16, F32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,out_dtype", RMS_CASES,
                         ids=["x".join(map(str, c[0])) + f"-{_name(c[1])}" + (f"-out_{_name(c[2])}" if c[2] else "")
                              for c in RMS_CASES])
def test_rms_norm_matches_reference(shape, dtype, out_dtype, backend):
    x, w = randn(*shape, dtype=dtype), 1 + 0.5 * randn(shape[-1])
    check(lambda x, w: rms_norm(x, w, 1e-5, out_dtype=out_dtype, backend=backend),
          lambda x, w: rms_norm_reference(x, w, 1e-5, out_dtype=out_dtype), [x, w], ["dx", "dweight"])


GATED_CASES = [
    # shape, group_size, y/z dtype, out dtype
    ((2, 7, 64), 32, F32, None),  # D = 2 * group_size
    ((1, 1, 100), 100, F32, None),  # one row, one group of a size not a power of two
    ((2, 5, 96), 48, BF16, None),
    ((3, 40), 10, F32, BF16),  # the autocast case, four groups
    ((1, 16384), 8192, F32, None),  # the largest groups the kernels are meant for
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("shape,group_size,dtype,out_dtype", GATED_CASES,
                         ids=["x".join(map(str, c[0])) + f"-g{c[1]}-{_name(c[2])}" + (f"-out_{_name(c[3])}" if c[3] else "")
                              for c in GATED_CASES])
def test_gated_rms_norm_matches_reference(shape, group_size, dtype, out_dtype, norm_before_gate, backend):
    y, z, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), 1 + 0.5 * randn(shape[-1])
    kw = dict(norm_before_gate=norm_before_gate, eps=1e-5, out_dtype=out_dtype)
    check(lambda y, z, w: gated_rms_norm(y, z, w, group_size=group_size, backend=backend, **kw),
          lambda y, z, w: gated_rms_norm_reference(y, z, w, group_size, **kw), [y, z, w], ["dy", "dz", "dweight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_gradients(backend):
    """A slice of a wider tensor (a row stride, no copy), a transposed batch (a copy), and
    gradients that arrive broadcast (row stride 0) or transposed (channel stride ≠ 1)."""
    B, T, D = 2, 5, 48
    wide, w = randn(B, T, D + 16), randn(D)
    check(lambda x, w: rms_norm(x, w, backend=backend), rms_norm_reference, [wide, w], ["dwide", "dweight"],
          view=lambda x, w: (x[..., 3:D + 3], w), do_view=lambda do: do[0, 0].expand_as(do))
    tb = randn(T, B, D)
    check(lambda x, w: rms_norm(x, w, backend=backend), rms_norm_reference, [tb, w], ["dx", "dweight"],
          view=lambda x, w: (x.transpose(0, 1), w), do_view=lambda do: do.transpose(1, 2).contiguous().transpose(1, 2))
    y, z = randn(T, B, D), randn(B, T, 2 * D)
    check(lambda y, z, w: gated_rms_norm(y, z, w, group_size=16, backend=backend),
          lambda y, z, w: gated_rms_norm_reference(y, z, w, 16), [y, z, w], ["dy", "dz", "dweight"],
          view=lambda y, z, w: (y.transpose(0, 1), z[..., D:], w))


def saved_bytes(fn):
    """Bytes autograd keeps for backward while ``fn()`` runs, and its result."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_inputs_and_rstd(backend):
    B, T, D, gs = 2, 6, 64, 16
    x, w = randn(B, T, D, dtype=BF16).requires_grad_(), randn(D).requires_grad_()
    bound = x.numel() * x.element_size() + B * T * 4 + w.numel() * 4
    n, out = saved_bytes(lambda: rms_norm(x, w, out_dtype=BF16, backend=backend))
    assert n <= bound, f"rms_norm saved {n} bytes > inputs + rstd = {bound}"
    out.float().sum().backward()  # what was saved is enough for backward
    n_ref, _ = saved_bytes(lambda: rms_norm_reference(x, w))
    assert n_ref > bound, "the bound does not tell the reference apart: the check is vacuous"

    y, z = x.detach().clone().requires_grad_(), randn(B, T, D, dtype=BF16).requires_grad_()
    bound = 2 * x.numel() * x.element_size() + B * T * (D // gs) * 4 + w.numel() * 4
    for nbg in (False, True):
        n, out = saved_bytes(lambda: gated_rms_norm(y, z, w, group_size=gs, norm_before_gate=nbg, backend=backend))
        assert n <= bound, f"gated_rms_norm saved {n} bytes > inputs + rstd = {bound}"
        out.float().sum().backward()
        n_ref, _ = saved_bytes(lambda: gated_rms_norm_reference(y, z, w, gs, nbg))
        assert n_ref > bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 48), (2, 0, 48), (4, 0)], ids=["R0", "T0", "D0"])
def test_empty_inputs(shape, backend):
    x, w = randn(*shape).requires_grad_(), randn(shape[-1]).requires_grad_()
    out = rms_norm(x, w, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()
    if shape[-1]:
        z = randn(*shape).requires_grad_()
        out = gated_rms_norm(x, z, w, group_size=16, backend=backend)
        out.sum().backward()
        assert out.shape == z.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast(backend):
    """Autocast changes nothing inside: the caller picks the output dtype."""
    x, w = randn(3, 32), randn(32)
    want = rms_norm(x, w, out_dtype=BF16, backend=backend)
    with torch.autocast(DEVICE, dtype=BF16):
        got = rms_norm(x, w, out_dtype=BF16, backend=backend)
    assert got.dtype == BF16 and torch.equal(got, want)


def test_checks_can_fail():
    """The tolerance tells neighbouring functions apart, so the comparisons above mean something."""
    y, z, w = randn(2, 5, 32), randn(2, 5, 32), randn(32)
    swapped = gated_rms_norm(y, z, w, group_size=16, norm_before_gate=True)
    assert rel_err(swapped, gated_rms_norm_reference(y, z, w, 16, norm_before_gate=False)) > 1e-2
    grouped = gated_rms_norm(y, z, w, group_size=16)
    assert rel_err(grouped, gated_rms_norm_reference(y, z, w, 32)) > 1e-2
    x = randn(4, 32)
    assert rel_err(rms_norm(x, w, eps=1e-5), rms_norm_reference(x, w * (1 + 1e-4))) > TOLERANCE[F32]


def test_rejects_bad_inputs():
    x, w = randn(2, 8), randn(8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, randn(7))
    with pytest.raises(ValueError, match="float"):
        rms_norm(torch.ones(2, 8, dtype=torch.int64, device=DEVICE), w)
    with pytest.raises(ValueError, match="out_dtype"):
        rms_norm(x, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="channel"):
        rms_norm(randn(()), w)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, backend="cuda")
    with pytest.raises(RuntimeError, match="fp16/bf16/fp32"):
        rms_norm(x.double(), w, backend="triton")
    for gs in (3, 0, 16, 2.0):
        with pytest.raises(ValueError, match="group_size"):
            gated_rms_norm(x, x, w, group_size=gs)
    with pytest.raises(ValueError, match="z must"):
        gated_rms_norm(x, randn(2, 4), w, group_size=4)


def test_fp64_runs_the_torch_path():
    x, w = randn(3, 24, dtype=torch.float64), randn(24, dtype=torch.float64)
    assert_close("out", rms_norm_reference(x, w), rms_norm(x, w), TOLERANCE[torch.float64])


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [2048, 256])
def test_triton_on_gpu_realistic_sizes(group_size):
    x, w = randn(4, 2048, 1024), 1 + 0.5 * randn(1024)
    check(lambda x, w: rms_norm(x, w, out_dtype=BF16, backend="triton"),
          lambda x, w: rms_norm_reference(x, w, out_dtype=BF16), [x, w], ["dx", "dweight"])
    y, z, w = randn(4, 2048, 2048, dtype=BF16), randn(4, 2048, 2048, dtype=BF16), 1 + 0.5 * randn(2048)
    for nbg in (False, True):
        check(lambda y, z, w: gated_rms_norm(y, z, w, group_size=group_size, norm_before_gate=nbg, backend="triton"),
              lambda y, z, w: gated_rms_norm_reference(y, z, w, group_size, nbg), [y, z, w], ["dy", "dz", "dweight"])
