"""Log-linear attention in O(T log T) with torch ops: the CPU path and the kernel's blueprint.

Chunks of ``C`` tokens (a power of two) are aligned to absolute positions, so a pair inside a
chunk sits at level ``bit_length(i XOR j)`` of its local indices, and a pair in chunks
``c_t > c_s`` at level ``log2(C) + bit_length(c_t XOR c_s)``: the inter-chunk part is the same
Fenwick structure over chunks. For query chunk ``c`` and inter level ``j`` (bit ``j − 1`` of
``c`` set) the keys form the aligned block of ``2**(j−1)`` chunks just left of
``mid = (c >> (j−1)) << (j−1)``, a left child at height ``j − 1`` of a binary tree over chunks.

Steps, all vectorised over batch, heads and chunks, with loops only over the log T levels:
1. intra-chunk: masked ``C × C`` product with the in-chunk level table;
2. chunk states ``S_c = Σ_{s∈c} exp(G_end(c) − G_s) k_s v_sᵀ``;
3. a tree over chunks, height by height: ``node = exp(ΔG_right) · S_left + S_right``;
4. each query chunk reads one node per set bit of its index:
   ``λ[t, log2(C) + j] · exp(G_t − G_end(node)) · q_tᵀ S_node``.
Decays are always sums of ``g`` over the interval they span (never a difference of two long
prefix sums), so fp32 keeps its relative precision however long the sequence is.
Everything is plain autograd; gradients flow to q, k, v, g, λ and the initial state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .state import LogLinearState, bit_length, check_inputs, compute_dtype, lam_as_4d

__all__ = ["chunked_log_linear_attn"]


def _split_heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """``[B', H', ...] -> [B', G', R', ...]``; a broadcast head dim (H' = 1) stays broadcast."""
    if x.shape[1] == 1:
        return x.unsqueeze(1)
    return rearrange(x, "b (g r) ... -> b g r ...", g=G)


def _pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of ``[B, T, ...]``."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (left, right))


def _parent_level(S: torch.Tensor, gt: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One tree height up: pair nodes ``(2m, 2m+1)`` into node ``m``.

    ``S``: ``[B, G, R, N, K, V]`` node states (decayed to each node's last token), ``gt``:
    ``[B, G, R, N]`` their total log-decays, ``first``: absolute index of node 0. Nodes outside
    the call's chunks are zero (they live in the initial state), so a missing sibling at either
    end is padded with a zero state and zero log-decay.
    """
    if first % 2 == 1:
        S = torch.cat([torch.zeros_like(S[:, :, :, :1]), S], dim=3)
        gt = torch.cat([torch.zeros_like(gt[..., :1]), gt], dim=-1)
        first -= 1
    if S.shape[3] % 2 == 1:
        S = torch.cat([S, torch.zeros_like(S[:, :, :, :1])], dim=3)
        gt = torch.cat([gt, torch.zeros_like(gt[..., :1])], dim=-1)
    S_left, S_right = rearrange(S, "b g r (n two) k v -> two b g r n k v", two=2)
    g_left, g_right = rearrange(gt, "b g r (n two) -> two b g r n", two=2)
    S_parent = torch.exp(g_right)[..., None, None] * S_left + S_right
    return S_parent, g_left + g_right, first // 2


def chunked_log_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    scale: float = 1.0,
    initial_state: LogLinearState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LogLinearState | None]:
    """Chunked log-linear attention; same arguments and results as ``naive_log_linear_attn``.

    Args:
        q, k: ``[B, T, G, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H]``; lam broadcastable to
            ``[B, T, H, L]`` (a broadcast λ, e.g. ``[1, 1, H, L]``, is never expanded to full size).
        chunk_size: ``C``, a power of two.

    Returns:
        ``(o [B, T, H, V] in v's dtype, LogLinearState or None)``.
    """
    B, T, G, H, K, V, L = check_inputs(q, k, v, g, lam, scale, initial_state)
    C = chunk_size
    if isinstance(C, bool) or not isinstance(C, int) or C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two >= 1, got {chunk_size!r}")
    log_c = C.bit_length() - 1
    dtype, device = compute_dtype(q.dtype), q.device

    # Align chunks to absolute multiples of C: a continuation from offset a starts with
    # (a mod C) dummy tokens (k = v = 0, g = 0) whose outputs are dropped.
    a = 0 if initial_state is None else int(initial_state.offset)
    pad_l = a % C
    pad_r = -(pad_l + T) % C
    NC = (pad_l + T + pad_r) // C
    c0 = (a - pad_l) // C  # absolute index of the first chunk
    c_last = c0 + NC - 1

    qc = rearrange(_pad_time(q.to(dtype), pad_l, pad_r), "b (n c) g k -> b g n c k", c=C)
    kc = rearrange(_pad_time(k.to(dtype), pad_l, pad_r), "b (n c) g k -> b g n c k", c=C)
    vc = rearrange(_pad_time(v.to(dtype), pad_l, pad_r), "b (n c) (g r) v -> b g r n c v", c=C, g=G)
    gc = rearrange(_pad_time(g.to(dtype), pad_l, pad_r), "b (n c) (g r) -> b g r n c", c=C, g=G)
    lam4 = lam_as_4d(lam).to(dtype)  # [B', T', H', L]
    if lam4.shape[1] > 1:
        lam4 = rearrange(_pad_time(lam4, pad_l, pad_r), "b (n c) h l -> b h n c l", c=C)
    else:
        lam4 = rearrange(lam4, "b t h l -> b h 1 t l")
    lam6 = _split_heads(lam4, G)  # [B', G', R', NC', C', L], NC' C' both 1 for a λ constant in time

    # 1. Intra-chunk.
    Gc = torch.cumsum(gc, dim=-1)  # [B, G, R, NC, C], log-decay from the chunk start (-inf past a reset)
    # A reset (g = -inf) makes Gc_i − Gc_j = -inf − (-inf) = NaN for pairs after it: pair
    # decays come from the finite part of g, and only within one reset segment.
    reset = gc == float("-inf")
    Gf = torch.cumsum(gc.masked_fill(reset, 0.0), dim=-1)
    seg = torch.cumsum(reset.to(torch.int32), dim=-1)
    i = torch.arange(C, device=device)
    causal = i[:, None] >= i[None, :]
    level = bit_length(i[:, None] ^ i[None, :]).clamp(max=L - 1)  # [C, C]
    lam_c = lam6.expand(*lam6.shape[:4], C, L)
    lam_intra = torch.gather(lam_c, -1, level.expand(*lam6.shape[:4], C, C))
    reach = causal & (seg[..., :, None] == seg[..., None, :])
    decay = torch.exp((Gf[..., :, None] - Gf[..., None, :]).masked_fill(~reach, float("-inf")))
    scores = torch.einsum("bgnik,bgnjk->bgnij", qc, kc)[:, :, None]  # shared by the R heads
    # where, not a product with the 0 weights: a non-finite future key in the chunk must not
    # reach earlier queries (0 · NaN is NaN); likewise the values, see _poison.
    weights = torch.where(reach, lam_intra * decay * scores, 0.0)
    o = torch.einsum("bgrnij,bgrnjv->bgrniv", weights, _finite_or_zero(vc))
    o = _poison(o, vc, dim=-2)

    # 2. Chunk states, decayed to each chunk's last token.
    g_chunk = Gc[..., -1]  # [B, G, R, NC]; -inf for a chunk with a reset, so the tree drops what precedes it
    to_end = (Gf[..., -1:] - Gf).masked_fill(seg[..., -1:] != seg, float("-inf"))
    S = torch.einsum("bgnck,bgrncv->bgrnkv", kc, vc * torch.exp(to_end)[..., None])

    # 3 + 4. Walk up the tree; at height h = j − 1 every chunk with bit h set reads the left
    # sibling of its ancestor. D is the log-decay from that node's end to the chunk's start:
    # it grows by the node's total each time a read happens, so it is never a difference.
    chunk = torch.arange(c0, c_last + 1, device=device)
    D = torch.zeros_like(g_chunk)
    nodes, node_g, first = S, g_chunk, c0
    h = 0
    while (c0 >> h) != (c_last >> h):  # once every chunk shares its height-h ancestor, no reads are left
        if h > 0:
            nodes, node_g, first = _parent_level(nodes, node_g, first)
        node = (chunk >> h) - 1
        valid = ((chunk >> h) & 1).bool() & (node >= first)
        idx = (node - first).clamp(0, nodes.shape[3] - 1)
        # A chunk with no node to read at this height gets a clamped index: zero what it reads
        # (rather than weighting it by 0), as that node may hold the chunk's own or a later
        # chunk's keys, NaN included.
        S_node = torch.where(valid[:, None, None], nodes[:, :, :, idx], 0.0)  # [B, G, R, NC, K, V]
        g_node = torch.where(valid, node_g[..., idx], 0.0)
        lam_j = lam6[..., min(log_c + h + 1, L - 1)]  # [B', G', R', NC', C']
        expo = torch.where(valid[:, None], Gc + D[..., None], float("-inf"))
        qS = torch.einsum("bgnck,bgrnkv->bgrncv", qc, S_node)
        o = o + (lam_j * torch.exp(expo))[..., None] * qS
        D = D + g_node
        h += 1

    n_in = 0 if initial_state is None else initial_state.levels.shape[2]
    levels_in = None
    if n_in > 0:
        # The state's bucket j meets query t at level max(j + 1, bit_length(t XOR a)), decayed
        # from a − 1 (the dummy tokens have g = 0, so a prefix sum over the padded chunks works).
        levels_in = _split_heads(initial_state.levels.to(dtype), G)  # [B, G, R, n, K, V]
        G_from_a = torch.cumsum(gc.flatten(-2), dim=-1).view_as(gc)
        pos = (c0 * C + torch.arange(NC * C, device=device)).view(NC, C)
        diff = bit_length(pos ^ a)
        lam_t = lam6.expand(*lam6.shape[:3], NC, C, L)
        for j in range(n_in):
            lvl = torch.clamp(diff, min=j + 1).clamp(max=L - 1)
            lam_sel = torch.gather(lam_t, -1, lvl[..., None].expand(*lam_t.shape[:-1], 1))[..., 0]
            qS = torch.einsum("bgnck,bgrkv->bgrncv", qc, levels_in[:, :, :, j])
            o = o + (lam_sel * torch.exp(G_from_a))[..., None] * qS

    o = rearrange(o, "b g r n c v -> b (n c) (g r) v")[:, pad_l : pad_l + T]
    o = (scale * o).to(v.dtype)
    if not output_final_state:
        return o, None
    return o, LogLinearState(_final_levels(k, v, g, a, levels_in, dtype), a + T)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _poison(o: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """NaN in ``o`` where a non-finite value of ``v`` lies at or before the row along ``dim``.

    The in-chunk product with the values runs over every key of the chunk, later ones at
    weight 0, and 0 · NaN is NaN: so it is taken over finite values only, and a non-finite
    value at s then marks the outputs t >= s of its chunk and value column, as a sum over
    s <= t alone would. Later chunks get it through the chunk state, which keeps it.
    """
    seen = torch.cumsum((~torch.isfinite(v)).to(torch.int32), dim=dim) > 0
    return o.masked_fill(seen, float("nan"))


def _final_levels(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    a: int,
    levels_in: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Bucket states at offset ``e = a + T`` as ``[B, H, n, K, V]``.

    Each bucket of ``e`` is a contiguous range of keys, so its new part is one product over
    that slice (T key rows in all); the initial state's buckets nest inside ``e``'s buckets.
    """
    B, T, G, K = k.shape
    H, V = v.shape[2:]
    e = a + T
    n_in = 0 if levels_in is None else levels_in.shape[3]
    n_out = max(e.bit_length(), n_in)
    g = g.to(dtype)
    # Σ_{u in (s, e−1]} g_u as a suffix sum, not as G_{e−1} − G_s.
    g_after = torch.flip(torch.cumsum(torch.flip(F.pad(g[:, 1:], (0, 0, 0, 1)), [1]), 1), [1])
    kf = k.to(dtype)
    vw = rearrange(v.to(dtype) * torch.exp(g_after)[..., None], "b t (g r) v -> b t g r v", g=G)
    parts: list[torch.Tensor | None] = [None] * n_out
    for b in range(n_out):
        if not (e >> b) & 1:
            continue
        base = (e >> (b + 1)) << (b + 1)
        lo, hi = max(base, a) - a, base + (1 << b) - a
        if lo < hi:
            parts[b] = torch.einsum("btgk,btgrv->bgrkv", kf[:, lo:hi], vw[:, lo:hi])
    if levels_in is not None:
        total = torch.exp(g.sum(1))  # [B, H]
        total = rearrange(total, "b (g r) -> b g r", g=G)[..., None, None]
        low = (e ^ a).bit_length() - 1
        for j in range(n_in):
            target = max(j, low)
            carried = total * levels_in[:, :, :, j]
            parts[target] = carried if parts[target] is None else parts[target] + carried
    zero = torch.zeros(B, G, H // G, K, V, device=k.device, dtype=dtype)
    levels = torch.stack([zero if p is None else p for p in parts], dim=3)
    return rearrange(levels, "b g r n k v -> b (g r) n k v")
