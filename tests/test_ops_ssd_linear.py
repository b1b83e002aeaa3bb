"""Torch references for Mamba-2 SSD and linear attention: chunked vs quadratic, steps, states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.ops.linear_attn import linear_attn_chunked, linear_attn_naive, linear_attn_step
from mixerzoo.ops.ssd import ssd_chunked, ssd_naive, ssd_step
from tests.utils import TOLERANCE, assert_close

TOL = TOLERANCE[torch.float32]


def ssd_inputs(B, T, H, P, G, N, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = rnd(B, T, H, P)
    dt = F.softplus(rnd(B, T, H) - 1.0)
    A = -torch.exp(rnd(H) * 0.5)
    Bm, Cm = rnd(B, T, G, N), rnd(B, T, G, N)
    D = rnd(H)
    return x, dt, A, Bm, Cm, D


def ssd_recurrent(x, dt, A, B, C, D, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


SSD_CASES = [(T, G) for T in (1, 5, 64, 100) for G in ("one", "all")]


@pytest.mark.parametrize("T,groups", SSD_CASES, ids=[f"T{T}-G{g}" for T, g in SSD_CASES])
def test_ssd_chunked_matches_quadratic(T, groups):
    H, P, N = 4, 8, 6
    G = 1 if groups == "one" else H
    inputs = ssd_inputs(2, T, H, P, G, N, seed=T)
    h0 = torch.randn(2, H, P, N)
    leaves = [t.clone().requires_grad_(True) for t in (*inputs, h0)]
    ref_leaves = [t.double().detach().requires_grad_(True) for t in leaves]
    x, dt, A, Bm, Cm, D, s0 = leaves
    y, ht = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=16, D=D, initial_state=s0,
                        output_final_state=True)
    rx, rdt, rA, rB, rC, rD, rs0 = ref_leaves
    y_ref, ht_ref = ssd_naive(rx, rdt, rA, rB, rC, D=rD, initial_state=rs0)
    assert y.dtype == torch.float32 and y_ref.dtype == torch.float64
    assert_close("y", y_ref, y, TOL)
    assert_close("final state", ht_ref, ht, TOL)
    do, dht = torch.randn_like(y), torch.randn_like(ht)
    ((y * do).sum() + (ht * dht).sum()).backward()
    ((y_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    for name, got, ref in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dh0"), leaves, ref_leaves):
        assert_close(name, ref.grad, got.grad, TOL)


def test_ssd_naive_matches_recurrence():
    """The quadratic spec against the plain recurrence, so neither rests on the other."""
    H, G = 4, 2
    x, dt, A, Bm, Cm, D = ssd_inputs(2, 23, H, 8, G, 6, seed=1, dtype=torch.float64)
    h0 = torch.randn(2, H, 8, 6, dtype=torch.float64)
    y_ref, ht_ref = ssd_naive(x, dt, A, Bm, Cm, D=D, initial_state=h0)
    y, ht = ssd_recurrent(x, dt, A, Bm, Cm, D, h0)
    assert_close("y", y_ref, y, TOLERANCE[torch.float64])
    assert_close("final state", ht_ref, ht, TOLERANCE[torch.float64])


@pytest.mark.parametrize("split", [1, 16, 37])
def test_ssd_state_continuation(split):
    x, dt, A, Bm, Cm, D = ssd_inputs(2, 70, 4, 8, 1, 6, seed=split)
    y_full, ht_full = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=16, D=D, output_final_state=True)
    a = slice(0, split)
    b = slice(split, None)
    y1, h1 = ssd_chunked(x[:, a], dt[:, a], A, Bm[:, a], Cm[:, a], chunk_size=16, D=D,
                         output_final_state=True)
    y2, h2 = ssd_chunked(x[:, b], dt[:, b], A, Bm[:, b], Cm[:, b], chunk_size=16, D=D,
                         initial_state=h1, output_final_state=True)
    assert_close("y", y_full, torch.cat((y1, y2), dim=1), TOL)
    assert_close("final state", ht_full, h2, TOL)
    # Steps from the mid state continue the same sequence.
    y_steps, h_steps = ssd_recurrent(x[:, b], dt[:, b], A, Bm[:, b], Cm[:, b], D, h1)
    assert_close("y (steps)", y_full[:, b], y_steps, TOL)
    assert_close("final state (steps)", ht_full, h_steps, TOL)


def test_ssd_keeps_dtype_and_rejects_bad_shapes():
    x, dt, A, Bm, Cm, D = ssd_inputs(1, 9, 4, 8, 2, 6)
    y, ht = ssd_chunked(x.bfloat16(), dt, A, Bm.bfloat16(), Cm.bfloat16(), chunk_size=4,
                        output_final_state=True)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert ssd_chunked(x, dt, A, Bm, Cm)[1] is None
    with pytest.raises(ValueError, match="divide"):
        ssd_chunked(x, dt, A, Bm[:, :, :1].expand(-1, -1, 3, -1), Cm[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(x, dt[:, :-1], A, Bm, Cm)


def linear_inputs(B, T, H, K, V, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("T", [1, 5, 64, 100])
def test_linear_chunked_matches_quadratic(T):
    q, k, v = linear_inputs(2, T, 3, 8, 12, seed=T)
    h0 = torch.randn(2, 3, 8, 12)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, h0)]
    ref_leaves = [t.double().detach().requires_grad_(True) for t in leaves]
    o, ht = linear_attn_chunked(*leaves[:3], scale=0.3, initial_state=leaves[3],
                                    output_final_state=True, chunk_size=16)
    o_ref, ht_ref = linear_attn_naive(*ref_leaves[:3], scale=0.3, initial_state=ref_leaves[3])
    assert_close("o", o_ref, o, TOL)
    assert_close("final state", ht_ref, ht, TOL)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    ((o * do).sum() + (ht * dht).sum()).backward()
    ((o_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    for name, got, ref in zip(("dq", "dk", "dv", "dh0"), leaves, ref_leaves):
        assert_close(name, ref.grad, got.grad, TOL)


def test_linear_steps_and_continuation():
    q, k, v = linear_inputs(2, 45, 3, 8, 12, seed=7, dtype=torch.float64)
    o_full, ht_full = linear_attn_naive(q, k, v)  # default scale K**-0.5
    o1, h1 = linear_attn_chunked(q[:, :20], k[:, :20], v[:, :20], output_final_state=True,
                                     chunk_size=8)
    o2, h2 = linear_attn_chunked(q[:, 20:], k[:, 20:], v[:, 20:], initial_state=h1,
                                     output_final_state=True, chunk_size=8)
    tol = TOLERANCE[torch.float64]
    assert_close("o (split)", o_full, torch.cat((o1, o2), dim=1), tol)
    assert_close("final state (split)", ht_full, h2, tol)
    state = torch.zeros(2, 3, 8, 12, dtype=torch.float64)
    outs = []
    for t in range(45):
        o_t, state = linear_attn_step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o_t)
    assert_close("o (steps)", o_full, torch.stack(outs, dim=1), tol)
    assert_close("final state (steps)", ht_full, state, tol)


def test_linear_quadratic_is_the_definition():
    """o_t = scale Σ_{s<=t} (q_t·k_s) v_s, written as a loop over t."""
    q, k, v = linear_inputs(1, 6, 2, 4, 5, seed=3, dtype=torch.float64)
    o, _ = linear_attn_naive(q, k, v, scale=0.5)
    for t in range(6):
        want = 0.5 * torch.einsum("bhk,bshk,bshv->bhv", q[:, t], k[:, : t + 1], v[:, : t + 1])
        assert_close(f"o[{t}]", want, o[:, t], 1e-12)
