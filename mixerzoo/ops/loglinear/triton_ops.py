"""Launchers for the Triton kernels and the autograd Function that ties them together."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .state import TRITON_HEAD_DIMS
from .triton_bwd import _bwd_kv, _bwd_q, _dstate, _dstate_combine
from .triton_fwd import _chunk_tree, _output, _tree_up

CHUNK = 64  # rows per chunk: the 64×64 intra-chunk tile fills the tensor cores
SEG = 16  # chunks per program when summing state gradients of wide nodes
FUSED_HEIGHTS = 3  # fixed by _chunk_tree's code: it builds heights 1–3 over blocks of 8 chunks
GRID_LIMIT = 65535  # CUDA's limit on grid dimensions y and z, which carry B·H or B·G
BWD_WARPS = 4  # of _bwd_q and _bwd_kv (8 was 1.4 ms slower at T = 2K on an H200)


@dataclass(frozen=True)
class TreeLayout:
    """Where each height's nodes live in the flat node buffer.

    Heights 0..NH−1 are the ones a query chunk reads (NH = ceil(log2 NT)); height h has
    ``ceil(NT / 2^h)`` nodes starting at ``offsets[h]``. Readers only load left (even) nodes,
    and below height FUSED_HEIGHTS the right nodes are never written: their slots hold garbage.
    """

    NT: int
    NH: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def n_nodes(self) -> int:
        return self.offsets[-1] + self.sizes[-1]

    @classmethod
    def of(cls, T: int, C: int) -> "TreeLayout":
        NT = triton.cdiv(T, C)
        NH = (NT - 1).bit_length()
        sizes = tuple(triton.cdiv(NT, 1 << h) for h in range(max(NH, 1)))
        offsets = tuple(sum(sizes[:h]) for h in range(len(sizes)))
        return cls(NT, NH, sizes, offsets)

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.offsets, dtype=torch.int32, device=device),
                torch.tensor(self.sizes, dtype=torch.int32, device=device))


def _precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' products.

    fp32 inputs get true fp32 products (tf32 would cost ~3e-4 relative error). bf16/fp16
    operands ignore the setting: a product of two inputs is exact in the fp32 accumulator.
    An fp32 intermediate (a state, a state gradient, a weighted score tile) stays fp32 and is
    multiplied in tf32 rather than rounded to bf16: 8× less rounding, which the backward's
    dG = q·dq − k·dk (a small difference of large sums) needs.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_triton_inputs(q, k, v, g, lam, chunk_size: int = CHUNK) -> None:
    """Reasons the kernels cannot take these inputs, as a ValueError."""
    K, V = q.shape[-1], v.shape[-1]
    if K not in TRITON_HEAD_DIMS or V not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton backend supports K, V in {TRITON_HEAD_DIMS}; got K={K}, V={V}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton backend takes fp32/bf16/fp16 inputs, got {q.dtype}")
    if not (q.device == k.device == v.device == g.device == lam.device):
        raise ValueError("q, k, v, g and lam must be on the same device")
    check_index_range(1, q.shape[1], v.shape[2], K, V, lam.shape[-1], chunk_size)


def max_batch_per_call(T: int, H: int, K: int, V: int, L: int, C: int = CHUNK) -> int:
    """How many sequences one launch of the kernels can take.

    The kernels index their tensors with 32-bit offsets, so the largest buffer (v, the node
    tree, dλ) must stay under 2^31 elements; and B·H programs run along one grid dimension,
    which CUDA caps at GRID_LIMIT.
    """
    per_seq = max(T * H * max(K, V), H * TreeLayout.of(T, C).n_nodes * K * V, T * H * L)
    return min((2**31 - 1) // per_seq, GRID_LIMIT // H)


def check_index_range(B: int, T: int, H: int, K: int, V: int, L: int, C: int = CHUNK) -> None:
    """Refuse a launch that would overflow 32-bit offsets or the grid, instead of wrapping
    around silently or failing inside CUDA."""
    fit = max_batch_per_call(T, H, K, V, L, C)
    if fit == 0:
        raise ValueError(
            f"one sequence of T={T} with H={H}, K={K}, V={V} overflows the 32-bit offsets of the "
            "Triton kernels: shorten the sequence (or continue it from a state) or use backend='torch'"
        )
    if B > fit:
        raise ValueError(
            f"one launch of the Triton kernels takes at most {fit} sequences of T={T} with H={H}, "
            f"K={K}, V={V} (32-bit offsets, at most {GRID_LIMIT} programs per grid dimension); "
            f"got B={B}: split the batch into calls of at most {fit} sequences"
        )


def _lam_view(lam: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    # expand() makes broadcast dimensions stride 0: the kernels read λ through its strides,
    # so an input-independent [1, 1, H, L] table is never materialised.
    return lam.expand(B, T, H, lam.shape[-1])


def build_tree(k, v, g, H: int, C: int = CHUNK):
    """The Fenwick tree of chunk states: node states ``[B·H, n_nodes, K, V]`` and their log
    decays ``[B·H, n_nodes]`` (fp32). The forward builds it for the output; the backward builds
    it again instead of keeping it: at K = 128 it is 1 KiB per token and head, more than all
    the layer's other activations together, and rebuilding costs one k^T v per chunk."""
    B, T, G, K = k.shape
    V = v.shape[3]
    lay = TreeLayout.of(T, C)
    BV = min(V, 64)
    nodes = torch.empty(B * H, lay.n_nodes, K, V, device=k.device, dtype=torch.float32)
    totals = torch.empty(B * H, lay.n_nodes, device=k.device, dtype=torch.float32)
    meta = dict(H=H, HG=H // G, G=G, K=K, V=V, C=C, BV=BV)
    # heights 1..3 start here in the node buffer (0 where the tree is not that tall)
    offs = [lay.offsets[h] if h < len(lay.offsets) else 0 for h in range(1, FUSED_HEIGHTS + 1)]
    _chunk_tree[(triton.cdiv(lay.NT, 1 << FUSED_HEIGHTS), V // BV, B * H)](
        k, v, g, nodes, totals, *offs, T, lay.NT, lay.n_nodes, len(lay.sizes), PREC=_precision(k.dtype), **meta
    )
    for h in range(FUSED_HEIGHTS + 1, lay.NH):
        _tree_up[(lay.sizes[h], V // BV, B * H)](
            nodes, totals, lay.offsets[h - 1], lay.sizes[h - 1], lay.offsets[h], lay.n_nodes, K=K, V=V, BV=BV
        )
    return nodes, totals


def forward(q, k, v, g, lam, scale: float, C: int = CHUNK):
    """o ``[B, T, H, V]`` plus the tree (node states and totals) it was computed from."""
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    lay = TreeLayout.of(T, C)
    lamx = _lam_view(lam, B, T, H)
    nodes, totals = build_tree(k, v, g, H, C)
    hoff, _ = lay.tensors(q.device)
    o = torch.empty_like(v)
    _output[(lay.NT, V // min(V, 64), B * H)](
        q, k, v, g, lamx, o, nodes, totals, hoff,
        T, lay.NT, lay.n_nodes, lay.NH, lamx.shape[-1], scale, *lamx.stride(),
        LOG2C=int(math.log2(C)), PREC=_precision(q.dtype), H=H, HG=H // G, G=G, K=K, V=V, C=C, BV=min(V, 64),
    )
    return o, nodes, totals


def backward(q, k, v, g, lam, do, nodes, totals, scale: float, C: int = CHUNK, seg: int = SEG):
    """dq, dk, dv (input dtype), dg (fp32), dλ (summed to λ's own, possibly broadcast, shape;
    λ's dtype when λ is per token, else fp32)."""
    B, T, G, K = q.shape
    H, V = v.shape[2], v.shape[3]
    HG = H // G
    lay = TreeLayout.of(T, C)
    lamx = _lam_view(lam, B, T, H)
    L = lamx.shape[-1]
    hoff, nsizes = lay.tensors(q.device)
    prec = _precision(q.dtype)
    log2seg = int(math.log2(seg))
    log2c = int(math.log2(C))
    nseg = triton.cdiv(lay.NT, seg)
    BV = min(V, 64)
    dstate = torch.empty_like(nodes)
    n_partial = max(0, lay.NH - log2seg - 1)
    partial = torch.empty(max(n_partial, 1), B * H, nseg, K, V, device=q.device, dtype=torch.float32)
    if lay.NH > 0:
        _dstate[(lay.NH * nseg * (V // BV), B * H)](
            q, do, g, lamx, dstate, partial, totals, hoff,
            T, lay.NT, lay.n_nodes, nseg, lay.NH, B * H, L, scale, *lamx.stride(),
            H=H, HG=HG, G=G, K=K, V=V, C=C, BV=BV, SEG=seg, LOG2SEG=log2seg,
            LOG2C=log2c, PREC=prec, num_warps=2,  # 2 warps: 3% faster fwd+bwd at T = 2K than 4
        )
    for hh in range(log2seg + 1, lay.NH):
        _dstate_combine[(lay.sizes[hh] // 2, V // BV, B * H)](
            dstate, partial, totals, hoff, hh, lay.NT, lay.n_nodes, nseg, B * H,
            K=K, V=V, BV=BV, LOG2SEG=log2seg,
        )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # a per-token λ gets its gradient in its own dtype straight from the kernel; a broadcast
    # one is summed to its shape in fp32 first
    full = tuple(lam.shape) == (B, T, H, L)
    dlam = torch.empty(B, T, H, L, device=q.device, dtype=lam.dtype if full else torch.float32)
    dgs = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    common = dict(H=H, HG=HG, G=G, K=K, V=V, C=C, LOG2C=log2c, PREC=prec, num_warps=BWD_WARPS)
    _bwd_q[(lay.NT, B * G)](
        q, k, v, g, lamx, do, nodes, totals, hoff, dq, dlam, dgs,
        T, lay.n_nodes, lay.NH, L, scale, *lamx.stride(), LP=triton.next_power_of_2(L), **common,
    )
    _bwd_kv[(lay.NT, B * G)](
        q, k, v, g, lamx, do, dstate, totals, hoff, nsizes, dk, dv, dgs,
        T, lay.NT, lay.n_nodes, lay.NH, L, scale, *lamx.stride(), **common,
    )
    # dG_t = q_t·dq_t − k_t·dk_t, and g enters G through a cumsum: dg is its reverse cumsum
    # (dG is laid out [B, H, T] for it: torch's scan over dim 1 of [B, T, H] is ~100× slower)
    dg = dgs.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
    return dq, dk, dv, dg, dlam.sum_to_size(lam.shape)


def _scaled(x: torch.Tensor, v_scale: torch.Tensor | None) -> torch.Tensor:
    if v_scale is None:
        return x.contiguous()
    from ..pointwise import scale_rows_forward

    return scale_rows_forward(x, v_scale)


class LogLinearAttnTriton(torch.autograd.Function):
    """Saves q, k, v (or x and v_scale, v = x·v_scale being formed again), g and λ; the node
    tree is rebuilt in backward (see :func:`build_tree`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, lam, scale, chunk_size, seg, v_scale):
        ctx.g_dtype = g.dtype
        q, k = q.contiguous(), k.contiguous()
        g = g.float().contiguous()
        o, _, _ = forward(q, k, _scaled(v, v_scale), g, lam, scale, chunk_size)
        ctx.save_for_backward(q, k, v if v_scale is not None else v.contiguous(), g, lam, v_scale)
        ctx.scale, ctx.chunk_size, ctx.seg = scale, chunk_size, seg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, x, g, lam, v_scale = ctx.saved_tensors
        v = _scaled(x, v_scale)
        nodes, totals = build_tree(k, v, g, v.shape[2], ctx.chunk_size)
        dq, dk, dv, dg, dlam = backward(q, k, v, g, lam, do.contiguous(), nodes, totals, ctx.scale, ctx.chunk_size, ctx.seg)
        dscale = None
        if v_scale is not None:
            from ..pointwise import scale_rows_backward

            dv, dscale = scale_rows_backward(dv, x, v_scale)
            dscale = dscale.to(v_scale.dtype)
        return dq, dk, dv, dg.to(ctx.g_dtype), dlam.to(lam.dtype), None, None, None, dscale


def triton_log_linear_attn(
    q, k, v, g, lam, scale: float = 1.0, chunk_size: int = CHUNK, seg: int = SEG, v_scale=None
) -> torch.Tensor:
    """o ``[B, T, H, V]`` of log-linear attention by the Triton kernels (differentiable).

    ``chunk_size`` and ``seg`` (chunks per program in the state-gradient pass) are powers of
    two; tests shrink them to reach many tree heights at tiny T. A batch larger than one launch
    can take (see ``max_batch_per_call``) runs in pieces. ``v_scale [B, T, H]``: the values
    are ``v · v_scale`` (see ``log_linear_attn``).
    """
    for name, val, lo in (("chunk_size", chunk_size, 16), ("seg", seg, 1)):
        if val < lo or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= {lo}, got {val}")
    check_triton_inputs(q, k, v, g, lam, chunk_size)
    B, T, H = q.shape[0], q.shape[1], v.shape[2]
    fit = max_batch_per_call(T, H, q.shape[-1], v.shape[-1], lam.shape[-1], chunk_size)
    if B > fit:
        per_seq_lam = lam.dim() == 4 and lam.shape[0] == B
        return torch.cat([
            triton_log_linear_attn(q[i:i + fit], k[i:i + fit], v[i:i + fit], g[i:i + fit],
                                   lam[i:i + fit] if per_seq_lam else lam, scale, chunk_size, seg,
                                   None if v_scale is None else v_scale[i:i + fit])
            for i in range(0, B, fit)
        ])
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        # The CPU interpreter's tl.dot is wrong on bf16 operands (Triton 3.9); run its bf16
        # calls in fp32 so that CPU tests of the kernel code check the kernel, not the emulator.
        if v_scale is not None:  # rounded to bf16 as on the GPU, then widened
            v, v_scale = (v.float() * v_scale[..., None]).to(v.dtype), None
        o = triton_log_linear_attn(q.float(), k.float(), v.float(), g, lam.float(), scale, chunk_size, seg)
        return o.to(v.dtype)
    if v_scale is not None and v_scale.shape != v.shape[:3]:
        raise ValueError(f"v_scale must be [B, T, H] = {list(v.shape[:3])}, got {list(v_scale.shape)}")
    return LogLinearAttnTriton.apply(q, k, v, g, lam, float(scale), chunk_size, seg, v_scale)
