"""The short causal conv and the SwiGLU product against their torch references.

Every case compares outputs and all gradients with the reference run in fp64 on the same
inputs, for both backends (Triton runs under TRITON_INTERPRET=1 on a CPU machine, so the
sizes here are tiny); inputs are views of wider tensors, as the models pass them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.mixers.mamba2 import Mamba2
from mixerzoo.ops.conv import causal_conv1d, causal_conv1d_reference
from mixerzoo.ops.swiglu import silu_mul, silu_mul_reference, swiglu_linear
from tests.utils import TOLERANCE, assert_close

BACKENDS = ["triton", "torch"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check(name, fn, ref, inputs, tol, extra_grads=()):
    """``fn`` on ``inputs`` vs ``ref`` on their fp64 copies: the output and every gradient."""
    wide = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*inputs)
    want = ref(*wide)
    do = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad(out, inputs, do.to(out.dtype))
    grads_ref = torch.autograd.grad(want, wide, do)
    assert out.dtype == inputs[0].dtype and out.is_contiguous()
    assert_close(f"{name} out", want, out, tol)
    for i, (g, g_ref, t) in enumerate(zip(grads, grads_ref, inputs)):
        assert g.dtype == t.dtype, f"{name} grad {i}: dtype {g.dtype} != {t.dtype}"
        assert_close(f"{name} grad {i}", g_ref, g, tol)


def saved_by(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*inputs)
    return saved


def assert_saves_only_inputs(fn, *inputs):
    """Every tensor kept for backward lives in an input's storage (no new activation buffers)."""
    ours = {t.untyped_storage().data_ptr() for t in inputs}
    saved = saved_by(fn, *inputs)
    assert saved, "nothing was saved"
    for t in saved:
        assert t.untyped_storage().data_ptr() in ours, f"saved a new tensor of shape {tuple(t.shape)}"


def slice_of_wider(*shape, dtype, pad=(5, 11)):
    """A ``shape`` view into the middle of a wider last dim, as in_proj's splits are."""
    *lead, C = shape
    wide = torch.randn(*lead, pad[0] + C + pad[1]).to(dtype)
    return wide[..., pad[0]:pad[0] + C]


# --- causal_conv1d ----------------------------------------------------------------------

CONV_CASES = [
    # B, T, C, W, bias, activation
    (1, 1, 72, 4, True, "silu"),  # T = 1: only the last tap sees data
    (3, 3, 72, 4, True, "silu"),  # T < W
    (3, 70, 72, 4, True, "silu"),  # T over two time blocks; C not a power of two, two bwd blocks
    (2, 33, 16, 2, False, None),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,C,W,bias,act", CONV_CASES,
                         ids=[f"B{c[0]}-T{c[1]}-C{c[2]}-W{c[3]}-{'bias' if c[4] else 'nobias'}-{c[5]}"
                              for c in CONV_CASES])
def test_causal_conv1d(B, T, C, W, bias, act, backend, dtype):
    # bf16 x with fp32 parameters, as autocast hands them over
    x = slice_of_wider(B, T, C, dtype=dtype).requires_grad_()
    weight = (torch.randn(C, W) / W**0.5).requires_grad_()
    inputs = [x, weight] + ([torch.randn(C).requires_grad_()] if bias else [])
    fn = lambda x, w, b=None: causal_conv1d(x, w, b, activation=act, backend=backend)  # noqa: E731
    ref = lambda x, w, b=None: causal_conv1d_reference(x, w, b, activation=act)  # noqa: E731
    check("conv", fn, ref, inputs, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_contiguous_and_autocast(backend):
    x = torch.randn(2, 9, 24, requires_grad=True)
    weight, bias = torch.randn(24, 3, requires_grad=True), torch.randn(24, requires_grad=True)
    check("conv contiguous", lambda *a: causal_conv1d(*a, backend=backend), causal_conv1d_reference,
          [x, weight, bias], TOLERANCE[torch.float32])
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv1d(xb, weight, bias, backend=backend)
        want = causal_conv1d_reference(xb, weight, bias)
    assert out.dtype == torch.bfloat16
    assert_close("conv autocast", want.float(), out, TOLERANCE[torch.bfloat16])
    dw, db = torch.autograd.grad(out.sum(), (weight, bias))
    assert dw.dtype == db.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_matches_mamba2(backend):
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, head_dim=16, chunk_size=16, backend="torch")
    u = torch.randn(2, 21, 32)
    xBC = m._split(m.in_proj(u))[1]  # a column slice of in_proj's output
    want = m._conv(xBC, None)[0]
    got = causal_conv1d(xBC, m.conv1d.weight[:, 0], m.conv1d.bias, backend=backend)
    assert_close("mamba2 conv", want, got, TOLERANCE[torch.float32])
    params = (m.in_proj.weight, m.conv1d.weight, m.conv1d.bias)
    do = torch.randn_like(want)
    grads = torch.autograd.grad(got, params, do, retain_graph=True)  # in_proj's graph is shared
    for g, g_ref in zip(grads, torch.autograd.grad(want, params, do)):
        assert_close("mamba2 conv grad", g_ref, g, TOLERANCE[torch.float32])


# --- silu_mul and swiglu_linear ---------------------------------------------------------

SILU_SHAPES = [(1, 1), (7, 100), (2, 5, 33), (3, 1100)]  # [..., H]; H = 1100 spans two blocks


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=["x".join(map(str, s)) for s in SILU_SHAPES])
def test_silu_mul(shape, backend, dtype):
    *lead, H = shape
    gate_up = torch.randn(*lead, 2 * H).to(dtype).requires_grad_()
    fn = lambda gu: silu_mul(*gu.chunk(2, dim=-1), backend=backend)  # noqa: E731
    ref = lambda gu: silu_mul_reference(*gu.chunk(2, dim=-1))  # noqa: E731
    check("silu_mul halves", fn, ref, [gate_up], TOLERANCE[dtype])
    gate, up = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(2))
    check("silu_mul", lambda g, u: silu_mul(g, u, backend=backend), silu_mul_reference, [gate, up], TOLERANCE[dtype])


def swiglu_ref(gate_up, weight):
    return F.linear(silu_mul_reference(*gate_up.chunk(2, dim=-1)), weight)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_linear(backend, dtype):
    gate_up = slice_of_wider(2, 9, 96, dtype=dtype).requires_grad_()
    weight = (torch.randn(40, 48) / 48**0.5).to(dtype).requires_grad_()
    check("swiglu_linear", lambda gu, w: swiglu_linear(gu, w, backend=backend), swiglu_ref,
          [gate_up, weight], TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_linear_autocast(backend):
    # the MLP as a model runs it: fp32 parameters, bf16 activations made by autocast
    x = torch.randn(3, 7, 16, requires_grad=True)
    w_up, w_down = torch.randn(64, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    results = []
    for mlp in (lambda gu, w: swiglu_linear(gu, w, backend=backend), swiglu_ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(F.linear(x, w_up), w_down)
        results.append((out, *torch.autograd.grad(out, (x, w_up, w_down), torch.ones_like(out))))
    for name, got, want in zip(("out", "dx", "dw_up", "dw_down"), *results):
        assert got.dtype == want.dtype, f"{name}: {got.dtype} != {want.dtype}"
        assert_close(f"swiglu autocast {name}", want.float(), got.float(), TOLERANCE[torch.bfloat16])


# --- what backward keeps, and refusals ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_inputs(backend):
    x = slice_of_wider(2, 10, 24, dtype=torch.bfloat16).requires_grad_()
    weight, bias = torch.randn(24, 4, requires_grad=True), torch.randn(24, requires_grad=True)
    assert_saves_only_inputs(lambda *a: causal_conv1d(*a, backend=backend), x, weight, bias)
    gate_up = torch.randn(10, 64, dtype=torch.bfloat16, requires_grad=True)
    assert_saves_only_inputs(lambda gu: silu_mul(*gu.chunk(2, -1), backend=backend), gate_up)
    w_down = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_saves_only_inputs(lambda gu, w: swiglu_linear(gu, w, backend=backend), gate_up, w_down)


def test_references_fail_the_saving_check():
    # the check above can fail: the plain torch code keeps new activation-sized tensors
    x, weight = torch.randn(2, 10, 24, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    gate_up, w_down = torch.randn(10, 64, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    for fn, inputs in ((causal_conv1d_reference, (x, weight)), (swiglu_ref, (gate_up, w_down)),
                       (lambda gu: silu_mul_reference(*gu.chunk(2, -1)), (gate_up,))):
        with pytest.raises(AssertionError, match="saved a new tensor"):
            assert_saves_only_inputs(fn, *inputs)


ERRORS = {
    "conv-x-2d": lambda: causal_conv1d(torch.randn(4, 8), torch.randn(8, 4)),
    "conv-weight-C": lambda: causal_conv1d(torch.randn(1, 4, 8), torch.randn(6, 4)),
    "conv-weight-3d": lambda: causal_conv1d(torch.randn(1, 4, 8), torch.randn(8, 1, 4)),
    "conv-bias": lambda: causal_conv1d(torch.randn(1, 4, 8), torch.randn(8, 4), torch.randn(4)),
    "conv-activation": lambda: causal_conv1d(torch.randn(1, 4, 8), torch.randn(8, 4), activation="relu"),
    "conv-backend": lambda: causal_conv1d(torch.randn(1, 4, 8), torch.randn(8, 4), backend="cuda"),
    "conv-int": lambda: causal_conv1d(torch.ones(1, 4, 8, dtype=torch.long), torch.randn(8, 4)),
    "silu-shape": lambda: silu_mul(torch.randn(3, 4), torch.randn(3, 5)),
    "silu-dtype": lambda: silu_mul(torch.randn(3, 4), torch.randn(3, 4).bfloat16()),
    "silu-backend": lambda: silu_mul(torch.randn(3, 4), torch.randn(3, 4), backend="naive"),
    "swiglu-odd": lambda: swiglu_linear(torch.randn(3, 7), torch.randn(2, 3)),
    "swiglu-weight": lambda: swiglu_linear(torch.randn(3, 8), torch.randn(2, 5)),
}


@pytest.mark.parametrize("make", ERRORS.values(), ids=ERRORS.keys())
def test_errors(make):
    with pytest.raises(ValueError):
        make()


# --- realistic sizes, on a GPU ----------------------------------------------------------

@pytest.mark.gpu
def test_gpu_conv_realistic():
    torch.manual_seed(0)
    wide = torch.randn(4, 2048, 4384, device="cuda", dtype=torch.bfloat16)
    x = wide[..., 1024:1024 + 2304].requires_grad_()
    weight = (torch.randn(2304, 4, device="cuda") / 2).requires_grad_()
    bias = torch.randn(2304, device="cuda", requires_grad=True)
    check("conv gpu", lambda *a: causal_conv1d(*a, backend="triton"), causal_conv1d_reference,
          [x, weight, bias], TOLERANCE[torch.bfloat16])
    runs = [torch.autograd.grad(causal_conv1d(x, weight, bias), (weight, bias), torch.ones(x.shape, device="cuda",
                                dtype=x.dtype)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "weight/bias grads are not deterministic"


@pytest.mark.gpu
def test_gpu_swiglu_realistic():
    torch.manual_seed(0)
    gate_up = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    check("silu_mul gpu", lambda gu: silu_mul(*gu.chunk(2, -1), backend="triton"),
          lambda gu: silu_mul_reference(*gu.chunk(2, -1)), [gate_up], TOLERANCE[torch.bfloat16])
    w_down = (torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) / 45).requires_grad_()
    check("swiglu_linear gpu", lambda gu, w: swiglu_linear(gu, w, backend="triton"), swiglu_ref,
          [gate_up, w_down], TOLERANCE[torch.bfloat16])
