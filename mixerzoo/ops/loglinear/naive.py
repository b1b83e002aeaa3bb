"""Log-linear attention, O(T^2): the ground truth every other backend is tested against.

Read this file to know what the op computes. For 0-based absolute positions and per head::

    o_t = Σ_{s<=t} λ[t, ℓ(t,s)] · exp(G_t − G_s) · scale · (q_t · k_s) · v_s
    ℓ(t,t) = 0,  ℓ(t,s) = bit_length(t XOR s),  G = cumsum(g)

with the level index clamped to ``L − 1`` (the top λ level serves all levels above it).
A continuation from a :class:`LogLinearState` at offset ``a`` adds, for each bucket ``j``,
``λ[t, max(j+1, bit_length(t XOR a))] · exp(G_t − G_{a−1}) · scale · q_tᵀ S_j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .state import LogLinearState, bit_length, check_inputs, compute_dtype, lam_as_4d

__all__ = ["naive_log_linear_attn"]


def naive_log_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    scale: float = 1.0,
    initial_state: LogLinearState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, LogLinearState | None]:
    """Log-linear attention from the full ``T × T`` weight matrix.

    Args:
        q, k: ``[B, T, G, K]``, ``G`` dividing ``H`` (value head ``h`` uses group ``h // (H // G)``).
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decay (<= 0).
        lam: ``[B, T, H, L]`` or broadcastable to it.
        scale: multiplies every ``q · k``.
        initial_state: state after the first ``offset`` tokens, or None (offset 0).
        output_final_state: also return the state after these tokens.

    Returns:
        ``(o [B, T, H, V] in v's dtype, state or None)``; computed in fp32 (fp64 for fp64 inputs).
    """
    B, T, G, H, K, V, L = check_inputs(q, k, v, g, lam, scale, initial_state)
    dtype, device = compute_dtype(q.dtype), q.device
    R = H // G
    # Expand the shared q/k groups to the value heads: the reference favours plainness.
    qh = q.to(dtype).repeat_interleave(R, dim=2)  # [B, T, H, K]
    kh = k.to(dtype).repeat_interleave(R, dim=2)
    vf = v.to(dtype)
    lamf = lam_as_4d(lam).to(dtype).expand(B, T, H, L)
    gf = g.to(dtype)
    Gc = rearrange(torch.cumsum(gf, dim=1), "b t h -> b h t")  # G_t − G_{a−1}
    # A reset (g = -inf) makes G_t − G_s = -inf − (-inf) = NaN for pairs after it, so pair
    # decays are taken from the finite part of g, within the same reset segment only.
    reset = gf == float("-inf")
    Gf = rearrange(torch.cumsum(gf.masked_fill(reset, 0.0), dim=1), "b t h -> b h t")
    seg = rearrange(torch.cumsum(reset.to(torch.int64), dim=1), "b t h -> b h t")

    a = 0 if initial_state is None else int(initial_state.offset)
    pos = a + torch.arange(T, device=device)
    causal = pos[:, None] >= pos[None, :]  # [T, S]
    level = bit_length(pos[:, None] ^ pos[None, :]).clamp(max=L - 1)  # [T, S], 0 on the diagonal

    # lam_ts[b, h, t, s] = λ[b, t, h, level[t, s]]
    lam_ts = torch.gather(lamf, 3, level[None, :, None, :].expand(B, T, H, T))
    lam_ts = rearrange(lam_ts, "b t h s -> b h t s")
    # -inf above the diagonal before exp, so that no exp(positive) overflows into 0 * inf.
    reach = causal & (seg[..., :, None] == seg[..., None, :])
    decay = torch.exp((Gf[..., :, None] - Gf[..., None, :]).masked_fill(~reach, float("-inf")))
    scores = torch.einsum("bthk,bshk->bhts", qh, kh)
    # where, not a product with the 0 weights: a non-finite future key must not reach t.
    weights = torch.where(reach, lam_ts * decay * scores, 0.0)
    o = torch.einsum("bhts,bshv->bthv", weights, _finite_or_zero(vf))
    o = _poison(o, vf, dim=1)

    levels_in = None
    if initial_state is not None and initial_state.levels.shape[2] > 0:
        levels_in = initial_state.levels.to(dtype)  # [B, H, n, K, V]
        n = levels_in.shape[2]
        j = torch.arange(n, device=device)
        # Bucket j of the state meets query t at level max(j + 1, bit_length(t XOR a)).
        lvl_state = torch.maximum(j[None, :] + 1, bit_length(pos ^ a)[:, None]).clamp(max=L - 1)
        lam_tj = torch.gather(lamf, 3, lvl_state[None, :, None, :].expand(B, T, H, n))
        qS = torch.einsum("bthk,bhjkv->bthjv", qh, levels_in)
        o = o + torch.einsum("bthj,bht,bthjv->bthv", lam_tj, torch.exp(Gc), qS)
    o = (scale * o).to(v.dtype)

    if not output_final_state:
        return o, None
    e = a + T
    n_in = 0 if initial_state is None else initial_state.levels.shape[2]
    n_out = max(e.bit_length(), n_in)
    # New key s goes to bucket bit_length(e XOR s) − 1, decayed to e − 1.
    bucket = F.one_hot(bit_length(pos ^ e) - 1, n_out).to(dtype)  # [T, n_out]
    # decay from s to e − 1: zero across a reset (again no -inf − (-inf))
    w = torch.exp((Gf[..., -1:] - Gf).masked_fill(seg[..., -1:] != seg, float("-inf")))  # [B, H, T]
    levels = torch.einsum("tj,bht,bthk,bthv->bhjkv", bucket, w, kh, vf)
    if levels_in is not None:
        # Dyadic intervals nest: bucket j of a lies inside bucket max(j, bit_length(e XOR a) − 1) of e.
        target = torch.clamp(torch.arange(n_in, device=device), min=(e ^ a).bit_length() - 1)
        merge = F.one_hot(target, n_out).to(dtype)  # [n_in, n_out]
        carried = torch.einsum("jm,bhjkv->bhmkv", merge, levels_in)
        levels = levels + torch.exp(Gc[..., -1])[..., None, None, None] * carried
    return o, LogLinearState(levels, e)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _poison(o: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """NaN in ``o`` where a non-finite value of ``v`` lies at or before the row along ``dim``.

    The weighted sum over values runs over every position, future ones at weight 0, and
    0 · NaN is NaN: so it is taken over finite values only, and a non-finite value at s then
    marks the outputs t >= s of its value column, as the sum over s <= t alone would.
    """
    seen = torch.cumsum((~torch.isfinite(v)).to(torch.int32), dim=dim) > 0
    return o.masked_fill(seen, float("nan"))
