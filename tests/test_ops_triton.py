"""The Triton backend of log_linear_attn against the naive definition: outputs and every gradient.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set by conftest) at tiny sizes;
the @gpu tests compile them for real and check the sizes the kernel work promises.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.ops.loglinear import log_linear_attn
from mixerzoo.ops.loglinear.triton_ops import triton_log_linear_attn
from tests.utils import rel_err

ON_GPU = torch.cuda.is_available()


def make_inputs(B, T, G, H, K, V, L, *, bcast=False, dtype=torch.float32, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = r(B, T, G, K)
    k = r(B, T, G, K) / math.sqrt(K)
    v = r(B, T, H, V)
    g = -F.softplus(r(B, T, H)) * 0.1
    lam = F.softplus(r(1, 1, H, L) if bcast else r(B, T, H, L)) + 0.1
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), g.to(device), cast(lam)


def grads_of(fn, inputs, do, upcast=False):
    wide = torch.float32 if inputs[0].is_cuda else torch.float64
    xs = [(x.to(wide) if upcast else x).detach().clone().requires_grad_() for x in inputs]
    o = fn(*xs)
    return o, torch.autograd.grad(o, xs, do.to(o.dtype))


def check_against(ref_backend, inputs, tol, scale=0.5, **triton_kw):
    """Triton vs ``ref_backend`` run on the same inputs upcast (fp64 on CPU, fp32 on GPU)."""
    do = torch.randn_like(inputs[2])
    o, gs = grads_of(lambda *x: triton_log_linear_attn(*x, scale=scale, **triton_kw), inputs, do)
    o_ref, gs_ref = grads_of(lambda *x: log_linear_attn(*x, scale=scale, backend=ref_backend)[0], inputs, do, upcast=True)
    errs = {"o": rel_err(o.cpu(), o_ref.cpu())}
    errs.update({f"d{n}": rel_err(a.cpu(), b.cpu()) for n, a, b in zip(("q", "k", "v", "g", "lam"), gs, gs_ref)})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors over {tol:g}: {bad} (all: {errs})"
    return errs


CPU_CASES = [
    # B, T, G, H, K, V, L, bcast
    # T = 1: o is λ·(q·k)·v per head, one score each, so two sequences of two groups keep a
    # single cancelling q·k (fp32 rounding ≫ 1e-5 of a tiny score) from deciding the error
    (2, 1, 2, 2, 16, 16, 1, False),
    (1, 15, 1, 2, 16, 16, 4, False),
    (2, 16, 2, 2, 16, 32, 5, False),
    (1, 17, 1, 2, 32, 16, 8, True),
    (1, 70, 2, 4, 16, 16, 8, False),
    (1, 100, 1, 2, 16, 16, 3, False),  # levels beyond the λ table reuse the top one
    (1, 200, 1, 2, 16, 16, 5, False),  # 13 chunks: a partial second block of 8
    (1, 277, 1, 2, 16, 16, 6, False),  # 18 chunks: the tree grows above the fused heights
]


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU tests below cover the GPU")
@pytest.mark.parametrize("B,T,G,H,K,V,L,bcast", CPU_CASES,
                         ids=[f"B{c[0]}-T{c[1]}-G{c[2]}-H{c[3]}-K{c[4]}-V{c[5]}-L{c[6]}{'-bcast' if c[7] else ''}" for c in CPU_CASES])
def test_triton_interpreter_matches_naive(B, T, G, H, K, V, L, bcast):
    inputs = make_inputs(B, T, G, H, K, V, L, bcast=bcast)
    # chunk 16 and 2-chunk segments: T=100 has 7 chunks, three inter-chunk heights, and the
    # segment-combining pass of the state gradients runs; T=277 has 18 chunks, so the tree
    # also has heights above the 8-chunk blocks its first kernel builds in registers
    check_against("naive", inputs, tol=1e-5, chunk_size=16, seg=2)


GPU_T = [1, 63, 64, 65, 1000, 4096, 16384]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("T", GPU_T, ids=[f"T{t}" for t in GPU_T])
def test_triton_gpu_matches_torch(T, dtype, tol):
    inputs = make_inputs(1, T, 2, 4, 64, 64, 15, dtype=dtype, device="cuda")
    check_against("torch", inputs, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("G,H,K,V,bcast", [(1, 4, 128, 64, False), (4, 4, 32, 128, True), (1, 2, 16, 16, False)],
                         ids=["G1-K128-V64", "G4-K32-V128-bcast", "G1-K16-V16"])
def test_triton_gpu_shapes(G, H, K, V, bcast):
    inputs = make_inputs(2, 777, G, H, K, V, 12, bcast=bcast, device="cuda")
    check_against("torch", inputs, tol=1e-4)


STATE_SPLITS = [(0, 37), (5, 40), (16, 16), (21, 70), (64, 3), (1, 1), (3, 2)]


@pytest.mark.skipif(ON_GPU, reason="interpreter test; test_triton_gpu_states covers the GPU")
@pytest.mark.parametrize("a,n", STATE_SPLITS, ids=[f"a{a}-n{n}" for a, n in STATE_SPLITS])
def test_triton_states_match_naive(a, n):
    """A prefix of a tokens through the naive op, then n tokens through Triton from its state:
    output, final state and all gradients (the initial state's too) equal the naive run."""
    check_states(a, n, make_inputs(1, a + n, 1, 2, 16, 16, 9), tol=1e-5)


def check_states(a, n, inputs, tol):
    prefix = [x[:, :a] if x.shape[1] == a + n else x for x in inputs]
    rest = [x[:, a:] if x.shape[1] == a + n else x for x in inputs]
    if a:
        _, state = log_linear_attn(*prefix, scale=0.5, output_final_state=True, backend="torch")
        # two spare zero levels: every backend keeps them, and reads them alike
        state = state._replace(levels=torch.nn.functional.pad(state.levels, (0, 0, 0, 0, 0, 2)))
    else:
        state = None

    def run(backend, xs, levels):
        s0 = None if state is None else state._replace(levels=levels)
        return log_linear_attn(*xs, scale=0.5, initial_state=s0, output_final_state=True, backend=backend)

    do = torch.randn_like(rest[2])
    results = {}
    for backend in ("triton", "naive"):
        xs = [x.detach().clone().requires_grad_() for x in rest]
        levels = None if state is None else state.levels.detach().clone().requires_grad_()
        o, final = run(backend, xs, levels)
        dht = torch.ones_like(final.levels)
        grads = torch.autograd.grad((o.float() * do).sum() + (final.levels * dht).sum(),
                                    xs + ([levels] if levels is not None else []))
        results[backend] = (o, final, grads)
    (o, fin, gs), (o_ref, fin_ref, gs_ref) = results["triton"], results["naive"]
    assert fin.offset == fin_ref.offset == a + n
    errs = {"o": rel_err(o, o_ref), "state": rel_err(fin.levels, fin_ref.levels)}
    errs.update({f"d{i}": rel_err(x, y) for i, (x, y) in enumerate(zip(gs, gs_ref))})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors over {tol:g}: {bad}"


@pytest.mark.gpu
@pytest.mark.parametrize("a,n", [(0, 1000), (1000, 3000), (4096, 63)], ids=["a0", "a1000", "a4096"])
def test_triton_gpu_states(a, n):
    check_states(a, n, make_inputs(1, a + n, 2, 4, 64, 64, 15, device="cuda"), tol=1e-4)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(ON_GPU, reason="the interpreter runs only without a GPU")),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
def test_triton_backend_in_a_model_decodes_like_its_forward(device):
    """A loglinear model on the Triton backend: prefill (a stateful kernel call) plus steps
    reproduce the tokens of repeated full forwards."""
    import mixerzoo

    torch.manual_seed(0)
    model = mixerzoo.build_model("loglinear_adaptive", size="tiny", vocab_size=50,
                                 mixer_options={"backend": "triton"}).to(device).eval()
    prompt = torch.randint(0, 50, (2, 21), device=device)
    out = model.generate(prompt, max_new_tokens=5)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert set(model.backends().values()) == {"triton"}


class _NanEmpty:
    """torch, except that empty() and empty_like() fill their buffers with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **kw):
        return torch.empty(*a, **kw).fill_(float("nan"))

    @staticmethod
    def empty_like(*a, **kw):
        return torch.empty_like(*a, **kw).fill_(float("nan"))


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
@pytest.mark.parametrize("T", [16, 16 * 9 - 5, 16 * 18, 16 * 33 - 7])
def test_triton_reads_only_what_it_wrote(T, monkeypatch):
    """The node buffers are torch.empty and only the slots the readers use are written:
    with every such buffer NaN-filled, a read of any other slot would poison the result."""
    import mixerzoo.ops.loglinear.triton_ops as ops

    monkeypatch.setattr(ops, "torch", _NanEmpty())
    check_against("naive", make_inputs(1, T, 1, 2, 16, 16, 6), tol=1e-5, chunk_size=16, seg=2)


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
def test_triton_splits_a_batch_too_large_for_one_launch(monkeypatch):
    import mixerzoo.ops.loglinear.triton_ops as ops

    # a grid limit of 5 programs and H = 2: two sequences per launch, so B = 5 runs in 3 pieces
    monkeypatch.setattr(ops, "GRID_LIMIT", 5)
    assert ops.max_batch_per_call(40, 2, 16, 16, 4, 16) == 2
    check_against("naive", make_inputs(5, 40, 1, 2, 16, 16, 4), tol=1e-5, chunk_size=16, seg=2)
    check_against("naive", make_inputs(5, 40, 2, 2, 16, 16, 4, bcast=True), tol=1e-5, chunk_size=16, seg=2)


@pytest.mark.skipif(ON_GPU, reason="interpreter test")
@pytest.mark.parametrize("lam_dtype", [torch.bfloat16, torch.float16])
def test_triton_gives_dlam_in_lams_dtype(lam_dtype):
    q, k, v, g, lam = make_inputs(2, 50, 1, 2, 16, 16, 5)
    lam = lam.to(lam_dtype)
    do = torch.randn_like(v)
    _, gs = grads_of(lambda *x: triton_log_linear_attn(*x, scale=0.5, chunk_size=16, seg=2), (q, k, v, g, lam), do)
    _, gs_ref = grads_of(lambda *x: log_linear_attn(*x, scale=0.5, backend="naive")[0], (q, k, v, g, lam), do, upcast=True)
    assert gs[4].dtype == lam_dtype
    assert rel_err(gs[4], gs_ref[4]) < 1e-2


def test_triton_refuses_what_it_cannot_compute():
    from mixerzoo.ops.loglinear.triton_ops import check_index_range

    q, k, v, g, lam = make_inputs(1, 8, 1, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="K, V in"):
        triton_log_linear_attn(q[..., :12], k[..., :12], v, g, lam)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        triton_log_linear_attn(q.double(), k.double(), v.double(), g, lam)
    with pytest.raises(ValueError, match="power of two"):
        triton_log_linear_attn(q, k, v, g, lam, chunk_size=48)
    # 32-bit offsets: 16 sequences of 16K tokens, 32 heads of 128 overflow the node tree; the
    # error says how many sequences fit in one launch (triton_log_linear_attn splits the batch)
    with pytest.raises(ValueError, match="at most 8 sequences"):
        check_index_range(B=16, T=16384, H=32, K=128, V=128, L=15)
    check_index_range(B=8, T=16384, H=32, K=128, V=128, L=15)
    # B·H programs along a grid dimension: at most 65535
    with pytest.raises(ValueError, match="at most 2047 sequences"):
        check_index_range(B=2048, T=64, H=32, K=64, V=64, L=7)
    # one sequence too long for a launch: nothing to split, so it is refused
    with pytest.raises(ValueError, match="one sequence of T=134217728 .* shorten the sequence"):
        triton_log_linear_attn(*(x.expand(1, 2**27, *x.shape[2:]) for x in (q[:, :1], k[:, :1], v[:, :1], g[:, :1], lam[:, :1])))
