"""Mamba-2's state-space duality (SSD) in plain torch: quadratic spec, chunked form, one step.

Per head h, with a scalar decay ``a_t = A[h] * dt[t, h] <= 0``, input ``u_t = x_t * dt_t``
(``[P]``) and the head's group ``B_t, C_t`` (``[N]``), the state ``S_t`` (``[P, N]``) runs

    S_t = exp(a_t) * S_{t-1} + u_t B_tᵀ,        y_t = S_t C_t + D * x_t

which unrolls to ``y_t = Σ_{s<=t} exp(Σ_{r=s+1..t} a_r) (C_t · B_s) u_s + D x_t``. Heads are
grouped contiguously: head ``h`` reads group ``h // (H // G)`` of B and C.

Shapes: x ``[B, T, H, P]``, dt ``[B, T, H]`` (positive, already through softplus),
A ``[H]`` (negative), B and C ``[B, T, G, N]``, D ``[H]`` or ``[H, P]``,
state ``[B, H, P, N]``. Everything is computed in fp32 (fp64 when x is fp64); outputs come
back in x's dtype and states stay in the compute dtype, since they are accumulators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .common import accumulation_dtype

__all__ = ["ssd_naive", "ssd_chunked", "ssd_step"]


def _check(x, dt, A, B, C, D, state) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P], got {tuple(x.shape)}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [B, T, H] = {(b, t, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [H] = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [B, T, G, N] with B, T = {b}, {t}; "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"the number of groups G={g} must divide the number of heads H={h}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be [H] or [H, P] = ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if state is not None and state.shape != (b, h, p, n):
        raise ValueError(f"state must be [B, H, P, N] = {(b, h, p, n)}, got {tuple(state.shape)}")
    return h // g, n


def _skip(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``D * x`` for x ``[..., H, P]`` and D ``[H]`` or ``[H, P]``."""
    return x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, O(T²): materialise the ``[T, T]`` decay-masked score matrix.

    Returns ``(y [B, T, H, P], final_state [B, H, P, N])``.
    """
    rep, _ = _check(x, dt, A, B, C, D, initial_state)
    cdt = accumulation_dtype(x.dtype)
    xf, dtf, Af = x.to(cdt), dt.to(cdt), A.to(cdt)
    Bf = repeat(B.to(cdt), "b t g n -> b t (g r) n", r=rep)
    Cf = repeat(C.to(cdt), "b t g n -> b t (g r) n", r=rep)
    u = xf * dtf[..., None]
    cum = torch.cumsum(dtf * Af, dim=1)  # [b, t, h]
    T = x.shape[1]
    diff = cum[:, :, None, :] - cum[:, None, :, :]  # [b, t, s, h] = cum_t - cum_s
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    # Mask before exp: above the diagonal the exponent is positive and could overflow.
    decay = torch.exp(diff.masked_fill(~causal[None, :, :, None], float("-inf")))
    scores = torch.einsum("bthn,bshn->btsh", Cf, Bf) * decay
    y = torch.einsum("btsh,bshp->bthp", scores, u)
    final = torch.einsum("bsh,bshp,bshn->bhpn", torch.exp(cum[:, -1:] - cum), u, Bf)
    if initial_state is not None:
        h0 = initial_state.to(cdt)
        y = y + torch.einsum("bthn,bhpn,bth->bthp", Cf, h0, torch.exp(cum))
        final = final + h0 * torch.exp(cum[:, -1])[..., None, None]
    if D is not None:
        y = y + _skip(xf, D.to(cdt))
    return y.to(x.dtype), final


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked SSD: quadratic inside chunks of ``chunk_size``, a recurrence across them.

    Any ``T >= 1``: the sequence is right-padded with ``dt = 0`` (no decay, no input), which
    leaves both the outputs and the final state of the real tokens unchanged.
    Returns ``(y [B, T, H, P], final_state [B, H, P, N] or None)``.
    """
    rep, n = _check(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cdt = accumulation_dtype(x.dtype)
    bsz, T, H, P = x.shape
    pad = (-T) % chunk_size
    # F.pad counts from the last dim: (0, 0) per trailing dim, then (0, pad) on time.
    xf = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad))
    dtf = F.pad(dt.to(cdt), (0, 0, 0, pad))
    Bf = F.pad(B.to(cdt), (0, 0, 0, 0, 0, pad))
    Cf = F.pad(C.to(cdt), (0, 0, 0, 0, 0, pad))
    Bc = repeat(Bf, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=rep)
    Cc = repeat(Cf, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=rep)
    u = rearrange(xf * dtf[..., None], "b (c l) h p -> b c l h p", l=chunk_size)
    a = rearrange(dtf * A.to(cdt), "b (c l) h -> b c l h", l=chunk_size)
    cum = torch.cumsum(a, dim=2)  # [b, c, l, h], log-decay from the chunk start

    # Inside each chunk: the quadratic form.
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [b, c, l, s, h]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf")))
    scores = torch.einsum("bclhn,bcshn->bclsh", Cc, Bc) * decay
    y = torch.einsum("bclsh,bcshp->bclhp", scores, u)

    # What each chunk adds to the state at its end, and how much it decays the state.
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # [b, c, l, h]
    chunk_states = torch.einsum("bclhn,bclh,bclhp->bchpn", Bc, to_end, u)
    chunk_decay = torch.exp(cum[:, :, -1, :])  # [b, c, h]

    # Across chunks: a short sequential scan over T / chunk_size chunk states.
    if initial_state is None:
        state = x.new_zeros(bsz, H, P, n, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, c, h, p, n]
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", Cc, entering, torch.exp(cum))

    y = rearrange(y, "b c l h p -> b (c l) h p")[:, :T]
    if D is not None:
        y = y + _skip(xf[:, :T], D.to(cdt))
    return y.to(x.dtype), (state if output_final_state else None)


def ssd_step(
    x_t: torch.Tensor,
    dt_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence, for decoding.

    x_t ``[B, H, P]``, dt_t ``[B, H]``, A ``[H]``, B_t and C_t ``[B, G, N]``,
    state ``[B, H, P, N]``. Returns ``(y_t [B, H, P], new state)``.
    """
    if x_t.dim() != 3 or B_t.dim() != 3:
        raise ValueError(
            f"ssd_step expects x_t [B, H, P] and B_t, C_t [B, G, N]; "
            f"got {tuple(x_t.shape)} and {tuple(B_t.shape)}"
        )
    rep, _ = _check(x_t[:, None], dt_t[:, None], A, B_t[:, None], C_t[:, None], D, state)
    cdt = accumulation_dtype(state.dtype)
    xf, dtf = x_t.to(cdt), dt_t.to(cdt)
    Bf = repeat(B_t.to(cdt), "b g n -> b (g r) n", r=rep)
    Cf = repeat(C_t.to(cdt), "b g n -> b (g r) n", r=rep)
    decay = torch.exp(dtf * A.to(cdt))[..., None, None]  # [b, h, 1, 1]
    state = state.to(cdt) * decay + torch.einsum("bhp,bhn->bhpn", xf * dtf[..., None], Bf)
    y = torch.einsum("bhpn,bhn->bhp", state, Cf)
    if D is not None:
        y = y + _skip(xf, D.to(cdt))
    return y.to(x_t.dtype), state
