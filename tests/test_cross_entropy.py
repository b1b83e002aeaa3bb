"""The fused linear cross-entropy against the unfused torch formula: loss, dh and dW.

On a CPU machine the Triton backend runs under TRITON_INTERPRET=1 (set by conftest) at tiny
sizes, with 64-wide vocabulary tiles so that V = 300 spans several; the @gpu tests run the
compiled kernel at a language-model size and check its memory.
"""

from __future__ import annotations

import pytest
import torch

from mixerzoo.ops import cross_entropy as ce
from mixerzoo.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tests.utils import TOLERANCE, assert_close, rel_err

BACKENDS = ["triton", "torch"]


def make_inputs(N, D, V, *, dtype=torch.float32, ignored=0.0, device="cpu", ignore_index=-100):
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    # logits of std ~3, so that softmax rows are peaked as a trained head's are
    w = torch.randn(V, D, generator=gen) * (3.0 / D**0.5)
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < ignored] = ignore_index
    return h.to(device, dtype), w.to(device), t.to(device), seed


def loss_and_grads(fn, h, w, t, grad_scale=1.0):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    dh, dw = torch.autograd.grad(loss * grad_scale, (h, w))
    return loss, dh, dw


def reference(h, w, t, ignore_index=-100):
    # Without autocast F.linear needs one dtype; the cast is differentiable, so dW stays fp32
    return linear_cross_entropy_reference(h, w.to(h.dtype), t, ignore_index=ignore_index)


def check(got, ref, tol, seed):
    for name, a, b in zip(("loss", "dh", "dW"), got, ref):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close(f"{name} (seed {seed})", b, a, tol)


CASES = [
    # N, D, V, chunk_tokens, fraction of ignored rows
    (50, 16, 37, 16, 0.0),  # N not a multiple of the chunk; V under one tile
    (1, 24, 300, None, 0.0),
    (12, 24, 300, 1, 0.0),  # one row per chunk; V over five tiles, the last partial
    (45, 16, 300, 16, 0.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "N,D,V,chunk,ignored", CASES,
    ids=[f"N{c[0]}-D{c[1]}-V{c[2]}-C{c[3]}{'-ignored' if c[4] else ''}" for c in CASES],
)
def test_matches_reference(N, D, V, chunk, ignored, dtype, backend):
    h, w, t, seed = make_inputs(N, D, V, dtype=dtype, ignored=ignored)
    got = loss_and_grads(lambda *x: linear_cross_entropy(*x, chunk_tokens=chunk, backend=backend), h, w, t)
    check(got, loss_and_grads(reference, h, w, t), TOLERANCE[dtype], seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_the_vocabulary(backend):
    h, w, t, seed = make_inputs(45, 16, 37, ignored=0.3, ignore_index=3)
    got = loss_and_grads(lambda *x: linear_cross_entropy(*x, ignore_index=3, chunk_tokens=16, backend=backend), h, w, t)
    ref = loss_and_grads(lambda *x: reference(*x, ignore_index=3), h, w, t)
    check(got, ref, TOLERANCE[torch.float32], seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored_gives_zero(backend):
    h, w, t, _ = make_inputs(20, 16, 37, ignored=1.0)
    loss, dh, dw = loss_and_grads(lambda *x: linear_cross_entropy(*x, chunk_tokens=8, backend=backend), h, w, t)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    assert reference(h, w, t).isnan(), "the reference is expected to give nan here"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_with_fp32_weights(backend):
    h, w, t, seed = make_inputs(40, 24, 300, ignored=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda *x: linear_cross_entropy(*x, chunk_tokens=25, backend=backend), h, w, t)
        ref = loss_and_grads(linear_cross_entropy_reference, h, w, t)
    check(got, ref, TOLERANCE[torch.bfloat16], seed)
    assert got[1].dtype == got[2].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_the_gradients(backend):
    h, w, t, seed = make_inputs(30, 16, 37, ignored=0.2)
    got = loss_and_grads(lambda *x: linear_cross_entropy(*x, chunk_tokens=7, backend=backend), h, w, t, grad_scale=3.7)
    check(got, loss_and_grads(reference, h, w, t, grad_scale=3.7), TOLERANCE[torch.float32], seed)


def test_backward_twice_with_retained_graph():
    h, w, t, _ = make_inputs(30, 16, 37)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, t, chunk_tokens=7)
    first = torch.autograd.grad(loss, h, retain_graph=True)[0]
    second = torch.autograd.grad(loss * 2.0, h)[0]
    assert torch.allclose(second, 2.0 * first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["h", "weight"])
def test_one_input_requires_grad(needs, backend):
    h, w, t, seed = make_inputs(30, 16, 37, ignored=0.2)
    x = (h if needs == "h" else w).requires_grad_()
    got = torch.autograd.grad(linear_cross_entropy(h, w, t, chunk_tokens=8, backend=backend), x)[0]
    ref = torch.autograd.grad(reference(h, w, t), x)[0]
    assert_close(f"d{needs} (seed {seed})", ref, got, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_grad", "plain_tensors"])
def test_evaluation_skips_the_gradient(mode, backend, monkeypatch):
    h, w, t, seed = make_inputs(40, 16, 300, ignored=0.2)
    calls = []
    step = ce._cross_entropy_rows_triton if backend == "triton" else ce._cross_entropy_rows_torch

    def spy(*args, write_grad, **kw):
        calls.append(write_grad)
        return step(*args, write_grad=write_grad, **kw)

    monkeypatch.setattr(ce, step.__name__, spy)
    if mode == "no_grad":
        h.requires_grad_(), w.requires_grad_()
        with torch.no_grad():
            loss = linear_cross_entropy(h, w, t, chunk_tokens=16, backend=backend)
    else:
        loss = linear_cross_entropy(h, w, t, chunk_tokens=16, backend=backend)
    assert calls == [False] * 3
    assert not loss.requires_grad
    with torch.no_grad():
        assert_close(f"loss (seed {seed})", reference(h, w, t), loss, TOLERANCE[torch.float32])


def test_nothing_of_size_N_by_V_is_saved():
    N, D, V = 40, 16, 300
    h, w, t, _ = make_inputs(N, D, V)
    h.requires_grad_(), w.requires_grad_()

    def saved_shapes(fn):
        shapes = []

        def pack(x):
            shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(h, w, t)
        return shapes

    assert (N, V) in saved_shapes(reference), "the hooks are expected to see the reference's logits"
    assert sorted(saved_shapes(lambda *x: linear_cross_entropy(*x, chunk_tokens=16))) == [(N, D), (V, D)]


def test_default_chunk_tokens():
    # 32,000 bf16 logits a row: 256 MiB is 4194 rows (2097 in fp32)
    assert ce.default_chunk_tokens(32768, 32000, torch.bfloat16) == 4194
    assert ce.default_chunk_tokens(32768, 32000, torch.float32) == 2097
    assert ce.default_chunk_tokens(32768, 10**6, torch.bfloat16) == 1024
    assert ce.default_chunk_tokens(700, 32000, torch.bfloat16) == 700


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V,block_v", [(37, 16), (300, 64), (256, 64)])
def test_kernel_rows_match_torch(V, block_v, dtype):
    """The row step alone, with logits far from zero, where a naive exp would overflow."""
    n = 24
    logits = (torch.randn(n, V) * 30 + 200).to(dtype)
    t = torch.randint(0, V, (n,))
    t[::5] = -100
    scale = torch.tensor(1 / 19.0)
    outs = []
    for step in (ce._cross_entropy_rows_triton, ce._cross_entropy_rows_torch):
        x, loss = logits.clone(), torch.empty(n)
        kw = {"block_v": block_v} if step is ce._cross_entropy_rows_triton else {}
        step(x, t, loss, scale, -100, write_grad=True, **kw)
        outs.append((loss, x.float()))
    (loss_a, grad_a), (loss_b, grad_b) = outs
    assert_close("row loss", loss_b, loss_a, 1e-6)
    assert_close("gradient", grad_b, grad_a, TOLERANCE[dtype])
    assert torch.equal(grad_a[::5], torch.zeros_like(grad_a[::5])), "ignored rows must get zero gradient"
    assert torch.equal(loss_a[::5], torch.zeros(len(loss_a[::5])))


def _bad_inputs():
    h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    return [
        ("h-3d", (h[None], w, t), {}, "h must be"),
        ("weight-D", (h, torch.randn(11, 9), t), {}, "weight must be"),
        ("targets-N", (h, w, t[:5]), {}, "targets must be"),
        ("targets-int32", (h, w, t.int()), {}, "int64"),
        ("target-V", (h, w, torch.tensor([0, 1, 11, 2, 3, 4])), {}, "targets hold 11"),
        ("target-negative", (h, w, torch.tensor([0, 1, -1, 2, -100, 4])), {}, "targets hold -1"),
        ("chunk-0", (h, w, t), {"chunk_tokens": 0}, "chunk_tokens"),
        ("backend", (h, w, t), {"backend": "cuda"}, "backend"),
    ]


@pytest.mark.parametrize("args,kwargs,match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*args, **kwargs)


def test_forced_triton_without_a_driver_raises(monkeypatch):
    monkeypatch.setattr(ce, "_KERNEL_INTERPRETED", False)
    h, w, t, _ = make_inputs(4, 8, 11)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        linear_cross_entropy(h, w, t, backend="triton")
    linear_cross_entropy(h, w, t)  # "auto" falls back to torch


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel at a language-model size


@pytest.mark.gpu
def test_gpu_lm_size_autocast_matches_reference_in_little_memory():
    N, D, V = 16384, 1024, 32000
    h, w, t, seed = make_inputs(N, D, V, ignored=0.05, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = loss_and_grads(linear_cross_entropy_reference, h, w, t)
        h, w = h.requires_grad_(), w.requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = linear_cross_entropy(h, w, t, backend="triton")
        got = (loss, *torch.autograd.grad(loss, (h, w)))
        torch.cuda.synchronize()
    # expected about 0.65 GiB: one 256 MiB chunk of logits, bf16 copies of h and W, dh and
    # the fp32 dW, and the returned gradients; the unfused loss needs several N*V*4 bytes
    peak = torch.cuda.max_memory_allocated() - base
    check(got, ref, TOLERANCE[torch.bfloat16], seed)
    assert peak < N * V * 4 / 2, f"fused loss peaked at {peak / 2**30:.2f} GiB over its inputs"


@pytest.mark.gpu
def test_gpu_kernel_rows_past_2_31_elements():
    """A chunk whose logits pass 2^31 elements: the row offsets must not wrap."""
    n, V = 67200, 32000
    logits = torch.randn(n, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, V, (n,), device="cuda")
    scale = torch.tensor(1 / n, device="cuda")
    rows = torch.cat([torch.arange(8), torch.arange(n - 8, n)]).cuda()
    want_x, want_loss = logits[rows].clone(), torch.empty(len(rows), device="cuda")
    ce._cross_entropy_rows_torch(want_x, t[rows], want_loss, scale, -100, write_grad=True)
    loss = torch.empty(n, device="cuda")
    ce._cross_entropy_rows_triton(logits, t, loss, scale, -100, write_grad=True)
    assert rel_err(loss[rows], want_loss) < 1e-5
    assert rel_err(logits[rows].float(), want_x.float()) < TOLERANCE[torch.bfloat16]
