"""Log-linear attention one token at a time: the binary-counter recurrence for decoding.

The state at offset ``e`` keeps one bucket per set bit of ``e`` (see :class:`LogLinearState`).
Consuming token ``e``:
1. decay every bucket by ``exp(g_e)`` (they are then decayed to position ``e``);
2. read ``o = scale · (λ[0] (q·k) v + Σ_j λ[j+1] qᵀ S_j)``: token ``e`` meets bucket ``j`` of
   ``e`` at level ``bit_length(e XOR s) = j + 1``;
3. insert ``k vᵀ`` and carry: with ``m`` the number of trailing ones of ``e``, the buckets
   ``j < m`` and the new key together are bucket ``m`` of ``e + 1`` (a binary increment).
"""

from __future__ import annotations

import numbers

import torch
from einops import rearrange

from .state import LogLinearState, check_state, compute_dtype

__all__ = ["log_linear_step"]


def _check_step(q_t, k_t, v_t, g_t, lam_t, scale) -> tuple[int, int, int, int, int, int]:
    """Validate one decoding step's inputs; return ``(B, G, H, K, V, L)``."""
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("g_t", g_t), ("lam_t", lam_t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.device != q_t.device:
            raise ValueError(f"{name} is on {x.device} but q_t is on {q_t.device}; use one device")
    if not (q_t.dtype == k_t.dtype == v_t.dtype):
        raise TypeError(f"q_t, k_t, v_t must share one dtype, got {q_t.dtype}, {k_t.dtype}, {v_t.dtype}")
    if q_t.dim() != 3 or k_t.shape != q_t.shape:
        raise ValueError(f"q_t and k_t must both be [B, G, K], got {tuple(q_t.shape)} and {tuple(k_t.shape)}")
    if v_t.dim() != 3 or v_t.shape[0] != q_t.shape[0]:
        raise ValueError(f"v_t must be [B, H, V] with B = {q_t.shape[0]}, got {tuple(v_t.shape)}")
    B, G, K = q_t.shape
    H, V = v_t.shape[1:]
    if H % G != 0:
        raise ValueError(f"the number of q/k groups G = {G} must divide the value heads H = {H}")
    if g_t.shape != (B, H):
        raise ValueError(f"g_t must be [B, H] = [{B}, {H}], got {tuple(g_t.shape)}")
    if lam_t.dim() < 1 or lam_t.dim() > 3 or lam_t.shape[-1] < 1:
        raise ValueError(f"lam_t must be [B, H, L] (L >= 1) or broadcastable to it, got {tuple(lam_t.shape)}")
    L = lam_t.shape[-1]
    try:
        torch.broadcast_shapes(lam_t.shape, (B, H, L))
    except RuntimeError:
        raise ValueError(
            f"lam_t of shape {tuple(lam_t.shape)} does not broadcast to [B, H, L] = [{B}, {H}, {L}]"
        ) from None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    return B, G, H, K, V, L


def log_linear_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    g_t: torch.Tensor,
    lam_t: torch.Tensor,
    state: LogLinearState | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, LogLinearState]:
    """Consume one token at position ``state.offset`` (0 when ``state`` is None).

    Args:
        q_t, k_t: ``[B, G, K]``; v_t: ``[B, H, V]``; g_t: ``[B, H]`` log-decay (<= 0);
        lam_t: ``[B, H, L]`` or broadcastable to it (level indices above ``L − 1`` reuse ``L − 1``).
        state: the state before this token, as from ``log_linear_attn(..., output_final_state=True)``.

    Returns:
        ``(o_t [B, H, V] in v_t's dtype, state at offset + 1)``; the state's level count grows
        to ``bit_length(offset + 1)`` when needed.
    """
    B, G, H, K, V, L = _check_step(q_t, k_t, v_t, g_t, lam_t, scale)
    dtype, device = compute_dtype(q_t.dtype), q_t.device
    if state is None:
        state = LogLinearState.zeros(B, H, K, V, device=device, dtype=dtype)
    check_state(state, B, H, K, V, device)
    e = int(state.offset)
    S = state.levels.to(dtype)
    n = max(S.shape[2], (e + 1).bit_length())
    if n > S.shape[2]:
        S = torch.cat([S, S.new_zeros(B, H, n - S.shape[2], K, V)], dim=2)

    q, k = q_t.to(dtype), k_t.to(dtype)
    v = rearrange(v_t.to(dtype), "b (g r) v -> b g r v", g=G)
    g = rearrange(g_t.to(dtype), "b (g r) -> b g r", g=G)
    lam = rearrange(lam_t.to(dtype).expand(B, H, L), "b (g r) l -> b g r l", g=G)
    S = rearrange(S, "b (g r) n k v -> b g r n k v", g=G) * torch.exp(g)[..., None, None, None]

    lam_levels = lam[..., torch.arange(1, n + 1, device=device).clamp(max=L - 1)]  # [B, G, R, n]
    read = torch.einsum("bgk,bgrnkv,bgrn->bgrv", q, S, lam_levels)
    own = lam[..., 0] * (q * k).sum(-1)[:, :, None]  # [B, G, R]
    o = scale * (own[..., None] * v + read)

    m = (e ^ (e + 1)).bit_length() - 1  # trailing ones of e
    merged = S[:, :, :, :m].sum(3) + torch.einsum("bgk,bgrv->bgrkv", k, v)
    S = torch.cat([torch.zeros_like(S[:, :, :, :m]), merged[:, :, :, None], S[:, :, :, m + 1 :]], dim=3)
    levels = rearrange(S, "b g r n k v -> b (g r) n k v")
    return rearrange(o, "b g r v -> b (g r) v").to(v_t.dtype), LogLinearState(levels, e + 1)
