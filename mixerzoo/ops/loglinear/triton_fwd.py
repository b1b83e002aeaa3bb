"""Triton forward of log-linear attention: chunk states, a tree of them, and the output.

Layout (all contiguous): q, k ``[B, T, G, K]``; v ``[B, T, H, V]``; g ``[B, T, H]`` fp32;
λ ``[B, T, H, L]`` read through its strides, so a broadcast λ (stride 0) is never copied.

With chunk size C, chunk c's keys meet query chunk c' > c at level
``log2(C) + bit_length(c ⊕ c')``. For a query chunk and each set bit h of its index, the keys
of that level form the aligned block of 2^h chunks just before the chunk's block at height h:
a node of a binary tree over chunks. So the forward is three fully parallel steps:

1. ``_chunk_tree``: per chunk, ``S_c = Σ_s exp(G_end − G_s) k_s v_sᵀ`` (K×V, fp32) and its
   total log-decay, and the tree's heights 1–3 over each block of 8 chunks, in registers.
2. ``_tree_up``: each further height, ``node = exp(total_right)·S_left + S_right``.
3. ``_output``: the intra-chunk block with the in-chunk level table, plus one ``q·S_node``
   product per set bit of the chunk index.

Every launch has (chunks × B·H) programs, whatever the batch size. Decays are accumulated
from node totals (never as a difference of a global cumsum), so long sequences keep fp32
precision.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_tree(
    k, v, g, nodes, totals, off1, off2, off3,
    T, NT, NNODES, NHS,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Chunk states and tree heights 1–3 for one block of 8 chunks (``offN``: where height N
    starts in the node buffer; ``NHS`` heights exist).

    The readers of the tree only ever load left (even) nodes; right nodes exist only to build
    their parents. So inside the block the right nodes of heights 0–2 stay in registers and
    are never written: this stores 8 of a block's 15 node states (4 + 2 + 1 + 1), and the
    ``_tree_up`` passes over heights 1–3 (a read and a write of every node) are gone. Height 3
    is stored whole, since ``_tree_up`` builds height 4 from it. Every node's total is stored.
    """
    i_blk, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    tile = ck[:, None] * V + cv[None, :]
    base = i_bh * NNODES
    acc = tl.zeros([K, BV], dtype=tl.float32)  # the node that starts at the block's chunk 0
    acc4 = tl.zeros([K, BV], dtype=tl.float32)  # the height-1 node of chunks 4 and 5
    zero = tl.sum(tl.zeros([2], dtype=tl.float32), 0)
    t1, t2, t3 = zero, zero, zero  # totals of the open nodes of heights 1, 2, 3
    for j in tl.static_range(8):
        c = i_blk * 8 + j
        if c < NT:
            rows = c * C + tl.arange(0, C)
            rmask = rows < T
            kk = tl.load(k + ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :], mask=rmask[:, None], other=0.0)
            vv = tl.load(v + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], mask=rmask[:, None], other=0.0)
            gg = tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0)
            gc = tl.cumsum(gg, 0)
            tot = tl.sum(gg, 0)
            # the decayed keys are an fp32 intermediate: keep them in fp32 (tf32 products for
            # bf16/fp16 inputs), since the backward's dq reads these states
            kd = kk.to(tl.float32) * tl.exp(tot - gc)[:, None]
            s = tl.dot(tl.trans(kd), vv.to(tl.float32), input_precision=PREC)
            if j % 2 == 0:
                tl.store(nodes + (base + c) * K * V + tile, s)
            acc = acc * tl.exp(tot) + s
            if j == 4:
                acc4 = s
            if j == 5:
                acc4 = acc4 * tl.exp(tot) + s
            t1 += tot
            t2 += tot
            t3 += tot
            last = c == NT - 1
            is_v0 = i_v == 0
            if is_v0:
                tl.store(totals + base + c, tot)
            # a node ends at its last chunk, or where the sequence ends
            end1 = (j % 2 == 1) | last
            end2 = (j % 4 == 3) | last
            end3 = (j == 7) | last
            if end1 & (NHS > 1):
                n1 = base + off1 + (c >> 1)
                if j // 2 == 0:
                    tl.store(nodes + n1 * K * V + tile, acc)
                if j // 2 == 2:
                    tl.store(nodes + n1 * K * V + tile, acc4)
                if is_v0:
                    tl.store(totals + n1, t1)
            if end2 & (NHS > 2):
                n2 = base + off2 + (c >> 2)
                if j // 4 == 0:
                    tl.store(nodes + n2 * K * V + tile, acc)
                if is_v0:
                    tl.store(totals + n2, t2)
            if end3 & (NHS > 3):
                n3 = base + off3 + (c >> 3)
                tl.store(nodes + n3 * K * V + tile, acc)
                if is_v0:
                    tl.store(totals + n3, t3)
            t1 = tl.where(end1, 0.0, t1)
            t2 = tl.where(end2, 0.0, t2)


@triton.jit
def _tree_up(
    nodes, totals, off_prev, n_prev, off_cur, NNODES,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
):
    i, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    base = i_bh * NNODES
    left = base + off_prev + 2 * i
    tile = (ck[:, None]) * V + cv[None, :]
    s = tl.load(nodes + left * K * V + tile)
    tot = tl.load(totals + left)
    if 2 * i + 1 < n_prev:
        right = left + 1
        tr = tl.load(totals + right)
        s = s * tl.exp(tr) + tl.load(nodes + right * K * V + tile)
        tot += tr
    cur = base + off_cur + i
    tl.store(nodes + cur * K * V + tile, s)
    if i_v == 0:
        tl.store(totals + cur, tot)


@triton.jit
def _level_lambda(lrow, rmask, lev, L, sl):
    """λ of one level for the chunk's rows, the level clamped to the table (top level reused)."""
    return tl.load(lrow + tl.minimum(lev, L - 1) * sl, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def _intra_decay(gc, C: tl.constexpr):
    """[C, C] ``exp(G_i − G_j)`` on the causal part, 0 above it."""
    ii = tl.arange(0, C)[:, None]
    jj = tl.arange(0, C)[None, :]
    # mask before exp: above the diagonal G_i − G_j > 0 and could overflow to inf · 0 = nan
    return tl.exp(tl.where(ii >= jj, gc[:, None] - gc[None, :], float("-inf")))


@triton.jit
def _intra_lambda(lrow, rmask, L, sl, C: tl.constexpr, LOG2C: tl.constexpr):
    """[C, C] ``λ[i, bit_length(i ⊕ j)]`` (any value above the diagonal)."""
    ii = tl.arange(0, C)[:, None]
    jj = tl.arange(0, C)[None, :]
    x = ii ^ jj
    w = tl.where(x == 0, _level_lambda(lrow, rmask, 0, L, sl)[:, None], 0.0)
    for lev in tl.static_range(1, LOG2C + 1):
        w = tl.where((x >> (lev - 1)) == 1, _level_lambda(lrow, rmask, lev, L, sl)[:, None], w)
    return w


@triton.jit
def _intra_weights(gc, lrow, rmask, L, sl, C: tl.constexpr, LOG2C: tl.constexpr):
    """[C, C] weights λ[t, bit_length(i ⊕ j)] · exp(G_i − G_j) on the causal part, 0 above it."""
    return _intra_lambda(lrow, rmask, L, sl, C, LOG2C) * _intra_decay(gc, C)


@triton.jit
def _output(
    q, k, v, g, lam, o, nodes, totals, hoff,
    T, NT, NNODES, NH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    qk_off = ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :]
    qq = tl.load(q + qk_off, mask=rmask[:, None], other=0.0)
    kk = tl.load(k + qk_off, mask=rmask[:, None], other=0.0)
    vv = tl.load(v + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], mask=rmask[:, None], other=0.0)
    gc = tl.cumsum(tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0), 0)
    lrow = lam + b * slb + rows * slt + h * slh

    s = tl.dot(qq, tl.trans(kk), input_precision=PREC) * scale
    # A later non-finite key or value must not reach earlier rows through the masked entries
    # (0 · NaN = NaN): mask with a select, zero non-finite values for the product and mark
    # every row from the first of them on as NaN, column by column, as the exact sum would.
    ri = tl.arange(0, C)
    a = tl.where(ri[:, None] >= ri[None, :], s * _intra_weights(gc, lrow, rmask, L, sl, C, LOG2C), 0.0)
    bad = (vv != vv) | (tl.abs(vv.to(tl.float32)) == float("inf"))
    acc = tl.dot(a.to(vv.dtype), tl.where(bad, tl.zeros_like(vv), vv), input_precision=PREC)
    first_bad = tl.min(tl.where(bad, ri[:, None], C), 0)  # per value column; C: none
    acc = tl.where(ri[:, None] >= first_bad[None, :], float("nan"), acc)

    # one node per set bit of the chunk index; `dec` is the log-decay from this chunk's start
    # back to the end of the node being read (the totals of the nodes already read).
    dec = 0.0
    base = i_bh * NNODES
    for hh in range(0, NH):
        if (i_t >> hh) & 1:
            node = base + tl.load(hoff + hh) + (i_t >> hh) - 1
            st = tl.load(nodes + (node * K + ck[:, None]) * V + cv[None, :])
            f = _level_lambda(lrow, rmask, LOG2C + 1 + hh, L, sl) * tl.exp(gc + dec) * scale
            acc += f[:, None] * tl.dot(qq, st.to(qq.dtype), input_precision=PREC)
            dec += tl.load(totals + node)
    tl.store(o + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], acc.to(o.dtype.element_ty), mask=rmask[:, None])
