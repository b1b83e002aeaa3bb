"""Recurrent states for the Triton backend: continuing from an offset, returning the final state.

The kernels assume the sequence starts at absolute position 0. A run from offset ``a`` is cut
into blocks ``[p, p + n)`` with ``p`` a multiple of the power of two at or above ``n`` (the
greedy dyadic split: at most ``log2 T + 1`` blocks, one block when ``a = 0``). Inside such a
block every pair's level ``bit_length(s ⊕ t)`` equals that of the block-local positions, so
the kernels compute the block exactly. What came before the block is the Fenwick state at
offset ``p``: its bucket ``j`` (a set bit of ``p``, so ``2^j >= n``) meets every query of the
block at level ``j + 1``, a ``q · S_j`` product per bucket. After the block the state is
advanced to ``p + n`` by the torch backend's own final-state step.

All glue is plain torch (fp32, differentiable); the kernels' own autograd handles the blocks.
"""

from __future__ import annotations

import torch
from einops import repeat

from .chunked import _final_levels, _split_heads
from .state import LogLinearState, bit_length, lam_as_4d
from .triton_ops import triton_log_linear_attn


def dyadic_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` as blocks ``[p, p + n)`` whose start ``p`` is a multiple of
    ``2^ceil(log2 n)`` (any ``n`` at ``p = 0``)."""
    blocks, p = [], start
    while p < end:
        n = end - p if p == 0 else min(p & -p, end - p)
        blocks.append((p, p + n))
        p += n
    return blocks


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """q/k ``[B, n, G, K]`` → ``[B, n, H, K]`` fp32 (value head h uses group h // (H // G))."""
    return repeat(x.float(), "b n g k -> b n (g r) k", r=H // x.shape[2])


def _read_state(q, g_cum, lam, levels, scale: float) -> torch.Tensor:
    """``Σ_j λ[t, ℓ_j(t)] exp(G_t − G_{p−1}) scale q_tᵀ S_j`` for a block at offset ``p``, with
    ``ℓ_j(t) = max(j + 1, bit_length(t ⊕ p))``: [B, n, H, V]. In a dyadic block the second term
    never wins for a set bit j of p; it matters only for (zero) levels at clear bits, which
    every backend treats alike."""
    H, L = levels.shape[1], lam.shape[-1]
    n = q.shape[1]
    qh = _per_head(q, H)
    decay = torch.exp(g_cum) * scale  # [B, n, H]
    # bit_length(t ⊕ p) = bit_length(t − p) for t in a dyadic block at p
    local_level = bit_length(torch.arange(n, device=q.device))
    lam_e = lam.float().expand(lam.shape[0], n, lam.shape[2], L)
    out = 0
    for j in range(levels.shape[2]):
        lvl = local_level.clamp(min=j + 1).clamp(max=L - 1)
        index = lvl.view(1, n, 1, 1).expand(lam_e.shape[0], n, lam_e.shape[2], 1)
        w = torch.gather(lam_e, 3, index)[..., 0] * decay  # [B, n, H]
        out = out + w[..., None] * torch.einsum("bnhk,bhkv->bnhv", qh, levels[:, :, j])
    return out


def _advance_state(levels, p: int, k, v, g) -> torch.Tensor:
    """The state at ``p + n`` from the state at ``p`` and the block's keys and log-decays
    ``g [B, n, H]``: [B, H, n', K, V] (the torch backend's own final-state step)."""
    levels_in = _split_heads(levels, k.shape[2]) if levels.shape[2] else None
    return _final_levels(k, v, g, p, levels_in, torch.float32)


def triton_log_linear_attn_stateful(
    q, k, v, g, lam, scale: float, initial_state: LogLinearState | None, output_final_state: bool
) -> tuple[torch.Tensor, LogLinearState | None]:
    """``log_linear_attn`` with states on the Triton kernels (see the module docstring)."""
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    start = 0 if initial_state is None else int(initial_state.offset)
    if initial_state is None:
        levels = q.new_zeros(B, H, 0, K, V, dtype=torch.float32)
    else:
        levels = initial_state.levels.float()
    lam4 = lam_as_4d(lam)
    outs = []
    for p, e in dyadic_blocks(start, start + T):
        piece = slice(p - start, e - start)
        lam_b = lam4[:, piece] if lam4.shape[1] != 1 else lam4
        gb = g[:, piece].float()
        o = triton_log_linear_attn(q[:, piece], k[:, piece], v[:, piece], gb, lam_b, scale)
        g_cum = gb.cumsum(1)
        if levels.shape[2]:
            o = (o.float() + _read_state(q[:, piece], g_cum, lam_b, levels, scale)).to(v.dtype)
        outs.append(o)
        if e < start + T or output_final_state:
            levels = _advance_state(levels, p, k[:, piece], v[:, piece], gb)
    o = torch.cat(outs, dim=1)
    return o, (LogLinearState(levels, start + T) if output_final_state else None)
