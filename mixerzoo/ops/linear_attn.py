"""Causal linear attention in plain torch: quadratic spec, chunked form, one step.

    o_t = scale · Σ_{s<=t} (q_t · k_s) v_s = scale · q_tᵀ S_t,      S_t = S_{t-1} + k_t v_tᵀ

No denominator: this is fla's ``chunk_linear_attn(..., normalize=False)``. Layout
``[B, T, H, K]`` for q and k, ``[B, T, H, V]`` for v, state ``[B, H, K, V]``. ``scale``
defaults to ``K ** -0.5`` as in fla. Computed in fp32 (fp64 when q is fp64); outputs come back
in q's dtype, states stay in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .common import accumulation_dtype

__all__ = ["linear_attn_naive", "linear_attn_chunked", "linear_attn_step"]


def _check(q, k, v, state) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    b, _, h, kd = q.shape
    expected = (b, h, kd, v.shape[-1])
    if state is not None and tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, K, V] = {expected}, got {tuple(state.shape)}")


def linear_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, O(T²). Returns ``(o [B, T, H, V], final_state [B, H, K, V])``."""
    _check(q, k, v, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bthk,bshk->bhts", qf, kf).masked_fill(~causal, 0.0)
    o = torch.einsum("bhts,bshv->bthv", scores, vf)
    final = torch.einsum("bshk,bshv->bhkv", kf, vf)
    if initial_state is not None:
        h0 = initial_state.to(cdt)
        o = o + torch.einsum("bthk,bhkv->bthv", qf, h0)
        final = final + h0
    return (scale * o).to(q.dtype), final


def linear_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked causal linear attention, O(T · chunk_size) and parallel across chunks.

    Without decay the state entering chunk c is a prefix sum of chunk states, so no
    sequential scan is needed. Any ``T >= 1`` (zero padding adds nothing to the state).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)``.
    """
    _check(q, k, v, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = accumulation_dtype(q.dtype)
    T = q.shape[1]
    pad = (-T) % chunk_size
    qc, kc, vc = (
        rearrange(F.pad(t.to(cdt), (0, 0, 0, 0, 0, pad)), "b (c l) h d -> b c h l d", l=chunk_size)
        for t in (q, k, v)
    )
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [b, c, h, l, l]
    o = scores @ vc

    chunk_states = kc.transpose(-1, -2) @ vc  # [b, c, h, k, v]
    inclusive = torch.cumsum(chunk_states, dim=1)
    entering = inclusive - chunk_states
    if initial_state is not None:
        entering = entering + initial_state.to(cdt)[:, None]
    o = o + qc @ entering

    o = rearrange(scale * o, "b c h l v -> b (c l) h v")[:, :T]
    final = None
    if output_final_state:
        final = entering[:, -1] + chunk_states[:, -1]
    return o.to(q.dtype), final


def linear_attn_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q_t, k_t ``[B, H, K]``, v_t ``[B, H, V]``, state ``[B, H, K, V]``.

    Returns ``(o_t [B, H, V], new state)``; the token attends to itself, as in the parallel form.
    """
    _check(q_t[:, None], k_t[:, None], v_t[:, None], state)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    cdt = accumulation_dtype(state.dtype)
    state = state.to(cdt) + torch.einsum("bhk,bhv->bhkv", k_t.to(cdt), v_t.to(cdt))
    o = scale * torch.einsum("bhk,bhkv->bhv", q_t.to(cdt), state)
    return o.to(q_t.dtype), state
