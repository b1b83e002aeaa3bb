"""Triton backward of log-linear attention.

With ``P_ts = λ[t, ℓ(t,s)] · exp(G_t − G_s) · scale · (q_t·k_s)(do_t·v_s)``:

* key-side state gradients: for every node N the forward reads,
  ``dS_N = Σ_{t reads N} λ[t, ℓ_N] · exp(G_t − G_end(N)) · scale · q_t do_tᵀ``. The readers of
  N are the 2^h chunks of its right sibling, each weighting q by its own level's λ, so dS is
  summed per node (``_dstate``): one program per segment of ``SEG`` chunks and height, and,
  for nodes wider than a segment, a second pass (``_dstate_combine``) that adds the segments'
  partial sums with their decays.
* ``_bwd_q`` (query side): the intra-chunk block's dq and in-chunk dλ, then, for each set bit
  of the chunk index, the node the forward read adds to dq and to dλ of that level.
* ``_bwd_kv`` (key side): the intra-chunk block's dk and dv, then each key chunk gathers the
  dS of the ≤ log(T/C) nodes that contain it.
  Both recompute the 64×64 score tiles rather than pass fp32 partial gradients through
  memory, and write dq, dk, dv once, in the input dtype, summed over the value heads of a
  q/k group inside the program.
* dg comes from ``dG_t = q_t·dq_t − k_t·dk_t`` (per value head) and a reverse cumsum, so it
  costs no pass of its own. It is a small difference of large sums, so the products that feed
  dq and dk with an fp32 operand (states, state gradients, the weighted score tile) keep it in
  fp32 (tf32 products for bf16/fp16 inputs) instead of rounding it to bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _intra_decay, _intra_lambda, _level_lambda


@triton.jit
def _dstate(
    q, do, g, lam, dstate, partial, totals, hoff,
    T, NT, NNODES, NSEG, NH, BH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    SEG: tl.constexpr, LOG2SEG: tl.constexpr, LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    # heights vary fastest over the grid: the programs of one segment at every height run
    # together and share its q and dO through L2 instead of reading them once per height.
    # (Segments go in grid dimension x with the heights: y is capped at 65535.)
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    hh, i_sv = i_p % NH, i_p // NH
    NVB: tl.constexpr = V // BV
    i_s, i_v = i_sv // NVB, i_sv % NVB
    b, h = i_bh // H, i_bh % H
    span = 1 << hh
    c_lo = i_s * SEG
    c_hi = tl.minimum(c_lo + SEG, NT)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    tile = ck[:, None] * V + cv[None, :]
    base = i_bh * NNODES
    acc = tl.zeros([K, BV], dtype=tl.float32)
    dec = 0.0
    # visit only the segment's chunks whose bit hh is set, in a loop without branches around
    # its loads so that the compiler prefetches the next chunk's q and dO (a chunk past the
    # sequence loads zeros and stores nothing)
    short = hh < LOG2SEG  # runs of readers shorter than a segment: half its chunks
    hs = tl.minimum(hh, LOG2SEG)
    in_sibling = ((i_s >> tl.maximum(hh - LOG2SEG, 0)) & 1) == 1
    n_it = tl.where(short, SEG // 2, tl.where(in_sibling, SEG, 0))
    for idx in range(0, n_it):
        c = tl.where(short, c_lo + ((idx >> hs) << (hs + 1)) + (1 << hs) + (idx & ((1 << hs) - 1)), c_lo + idx)
        # a new run of readers starts at the first chunk of the right sibling
        fresh = (c & (span - 1)) == 0
        acc = tl.where(fresh, 0.0, acc)
        dec = tl.where(fresh, 0.0, dec)
        rows = c * C + tl.arange(0, C)
        rmask = rows < T
        qq = tl.load(q + ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :], mask=rmask[:, None], other=0.0)
        dd = tl.load(do + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], mask=rmask[:, None], other=0.0)
        gc = tl.cumsum(tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0), 0)
        lrow = lam + b * slb + rows * slt + h * slh
        f = _level_lambda(lrow, rmask, LOG2C + 1 + hh, L, sl) * tl.exp(gc + dec) * scale
        acc += tl.dot(tl.trans(qq.to(tl.float32) * f[:, None]), dd.to(tl.float32), input_precision=PREC)
        valid = c < c_hi
        dec += tl.load(totals + base + c, mask=valid, other=0.0)
        last = ((c + 1) & (span - 1)) == 0
        if valid & (last | (c == c_hi - 1)):
            if hh <= LOG2SEG:
                node = base + tl.load(hoff + hh) + (c >> hh) - 1
                tl.store(dstate + node * K * V + tile, acc)
            else:
                hp = hh - LOG2SEG - 1
                tl.store(partial + (((hp * BH + i_bh) * NSEG + i_s) * K) * V + tile, acc)


@triton.jit
def _dstate_combine(
    dstate, partial, totals, hoff, hh, NT, NNODES, NSEG, BH,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, LOG2SEG: tl.constexpr,
):
    """dS of the left nodes at height ``hh`` (wider than a segment) from segment partials."""
    i_n, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = 2 * i_n
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    tile = ck[:, None] * V + cv[None, :]
    base = i_bh * NNODES
    per = 1 << (hh - LOG2SEG)  # segments per node
    s_lo = (n + 1) * per
    s_hi = tl.minimum(s_lo + per, (NT + (1 << LOG2SEG) - 1) >> LOG2SEG)
    seg_off = tl.load(hoff + LOG2SEG)
    acc = tl.zeros([K, BV], dtype=tl.float32)
    dec = 0.0
    for s in range(s_lo, s_hi):
        hp = hh - LOG2SEG - 1
        acc += tl.exp(dec) * tl.load(partial + (((hp * BH + i_bh) * NSEG + s) * K) * V + tile)
        dec += tl.load(totals + base + seg_off + s)
    node = base + tl.load(hoff + hh) + n
    tl.store(dstate + node * K * V + tile, acc)


# NH stays a runtime value: specialised to the constant 1 (T = 65 … 128), Triton 3.6 fails to
# compile _bwd_kv's level loop with tf32 products on Hopper ("PassManager::run failed")
@triton.jit(do_not_specialize=["NH"])
def _bwd_q(
    q, k, v, g, lam, do, nodes, totals, hoff, dq, dlam, dgs,
    T, NNODES, NH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LP: tl.constexpr,
    LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    """dq (summed over the group's value heads), dλ of every level, and q·dq per value head
    (the first half of dG), for one chunk and one q/k group."""
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    b, grp = i_bg // G, i_bg % G
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    cl = tl.arange(0, LP)
    ii = tl.arange(0, C)[:, None]
    jj = tl.arange(0, C)[None, :]
    x = ii ^ jj
    qk_off = ((b * T + rows[:, None]) * G + grp) * K + ck[None, :]
    qq = tl.load(q + qk_off, mask=rmask[:, None], other=0.0)
    kk = tl.load(k + qk_off, mask=rmask[:, None], other=0.0)
    s = tl.dot(qq, tl.trans(kk), input_precision=PREC) * scale
    qf = qq.to(tl.float32)
    kf = kk.to(tl.float32)
    dq_grp = tl.zeros([C, K], dtype=tl.float32)
    for hg in range(HG):
        h = grp * HG + hg
        vo_off = ((b * T + rows[:, None]) * H + h) * V + cv[None, :]
        vv = tl.load(v + vo_off, mask=rmask[:, None], other=0.0)
        dd = tl.load(do + vo_off, mask=rmask[:, None], other=0.0)
        gc = tl.cumsum(tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0), 0)
        lrow = lam + b * slb + rows * slt + h * slh
        dp = tl.dot(dd, tl.trans(vv), input_precision=PREC)
        dpd = dp * _intra_decay(gc, C)
        sdp = s * dpd
        ds = dpd * _intra_lambda(lrow, rmask, L, sl, C, LOG2C) * scale
        dq_h = tl.dot(ds, kf, input_precision=PREC)
        # in-chunk dλ: row sums of s·dp·decay over each level's block of columns
        dl_acc = tl.where(cl[None, :] == 0, tl.sum(tl.where(x == 0, sdp, 0.0), 1)[:, None], 0.0)
        for lev in tl.static_range(1, LOG2C + 1):
            r = tl.sum(tl.where((x >> (lev - 1)) == 1, sdp, 0.0), 1)
            dl_acc += tl.where(cl[None, :] == tl.minimum(lev, L - 1), r[:, None], 0.0)
        # inter-chunk levels: one node per set bit of the chunk index, as in the forward
        ddf = dd.to(tl.float32)
        base = (b * H + h) * NNODES
        dec = 0.0
        for hh in range(0, NH):
            n = i_t >> hh
            if n & 1:
                node = base + tl.load(hoff + hh) + n - 1
                st = tl.load(nodes + (node * K + ck[:, None]) * V + cv[None, :])
                e = tl.exp(gc + dec) * scale
                lam_l = _level_lambda(lrow, rmask, LOG2C + 1 + hh, L, sl)
                # S·dO serves both: dq gains λe·(S·dO) and dλ gains e·q·(S·dO) = e·(q·S)·dO
                sdo = tl.dot(ddf, tl.trans(st), input_precision=PREC)
                dq_h += (lam_l * e)[:, None] * sdo
                r_q = e * tl.sum(qf * sdo, 1)
                dl_acc += tl.where(cl[None, :] == tl.minimum(LOG2C + 1 + hh, L - 1), r_q[:, None], 0.0)
                dec += tl.load(totals + node)
        tl.store(dlam + ((b * T + rows[:, None]) * H + h) * L + cl[None, :], dl_acc.to(dlam.dtype.element_ty),
                 mask=rmask[:, None] & (cl[None, :] < L))
        tl.store(dgs + (b * H + h) * T + rows, tl.sum(qf * dq_h, 1), mask=rmask)
        dq_grp += dq_h
    tl.store(dq + qk_off, dq_grp.to(dq.dtype.element_ty), mask=rmask[:, None])


@triton.jit(do_not_specialize=["NH"])  # see _bwd_q
def _bwd_kv(
    q, k, v, g, lam, do, dstate, totals, hoff, nsizes, dk, dv, dgs,
    T, NT, NNODES, NH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    """dk (summed over the group's value heads) and dv, for one chunk and one q/k group;
    completes dG = q·dq − k·dk per value head."""
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    b, grp = i_bg // G, i_bg % G
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    qk_off = ((b * T + rows[:, None]) * G + grp) * K + ck[None, :]
    qq = tl.load(q + qk_off, mask=rmask[:, None], other=0.0)
    kk = tl.load(k + qk_off, mask=rmask[:, None], other=0.0)
    s = tl.dot(qq, tl.trans(kk), input_precision=PREC) * scale
    qf = qq.to(tl.float32)
    kf = kk.to(tl.float32)
    dk_grp = tl.zeros([C, K], dtype=tl.float32)
    for hg in range(HG):
        h = grp * HG + hg
        vo_off = ((b * T + rows[:, None]) * H + h) * V + cv[None, :]
        vv = tl.load(v + vo_off, mask=rmask[:, None], other=0.0)
        dd = tl.load(do + vo_off, mask=rmask[:, None], other=0.0)
        gg = tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0)
        gc = tl.cumsum(gg, 0)
        tot = tl.sum(gg, 0)
        lrow = lam + b * slb + rows * slt + h * slh
        w = _intra_lambda(lrow, rmask, L, sl, C, LOG2C) * _intra_decay(gc, C)
        dp = tl.dot(dd, tl.trans(vv), input_precision=PREC)
        dv_h = tl.dot(tl.trans((s * w).to(dd.dtype)), dd, input_precision=PREC)
        dk_h = tl.dot(tl.trans(dp * w * scale), qf, input_precision=PREC)
        # inter-chunk levels: each clear bit of the chunk index is a node holding this chunk
        vf = vv.to(tl.float32)
        base = (b * H + h) * NNODES
        dec = 0.0  # log-decay from the end of this chunk to the end of the node at this height
        for hh in range(0, NH):
            n = i_t >> hh
            if (n & 1) == 0:
                off = tl.load(hoff + hh)
                if ((n + 1) << hh) < NT:
                    dst = tl.load(dstate + ((base + off + n) * K + ck[:, None]) * V + cv[None, :])
                    e2 = tl.exp(tot - gc + dec)
                    dk_h += e2[:, None] * tl.dot(vf, tl.trans(dst), input_precision=PREC)
                    dv_h += e2[:, None] * tl.dot(kk, dst.to(kk.dtype), input_precision=PREC)
                if n + 1 < tl.load(nsizes + hh):
                    dec += tl.load(totals + base + off + n + 1)
        tl.store(dv + vo_off, dv_h.to(dv.dtype.element_ty), mask=rmask[:, None])
        dg_off = (b * H + h) * T + rows  # [B, H, T]: the reverse cumsum runs on the last dim
        dg_h = tl.load(dgs + dg_off, mask=rmask, other=0.0) - tl.sum(kf * dk_h, 1)
        tl.store(dgs + dg_off, dg_h, mask=rmask)
        dk_grp += dk_h
    tl.store(dk + qk_off, dk_grp.to(dk.dtype.element_ty), mask=rmask[:, None])
