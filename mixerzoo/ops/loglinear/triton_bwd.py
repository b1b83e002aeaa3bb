"""Triton backward of log-linear attention.

With ``P_ts = λ[t, ℓ(t,s)] · exp(G_t − G_s) · scale · (q_t·k_s)(do_t·v_s)``:

* query side (dq, dλ) reads the forward's node states, exactly as the forward does;
* key side (dk, dv) needs, for every node N the forward reads, the gradient of its state,
  ``dS_N = Σ_{t reads N} λ[t, ℓ_N] · exp(G_t − G_end(N)) · scale · q_t do_tᵀ``. The readers of
  N are the 2^h chunks of its right sibling, each weighting q by its own level's λ, so dS is
  summed per node (``_dstate``): one program per segment of ``SEG`` chunks and height, and,
  for nodes wider than a segment, a second pass (``_dstate_combine``) that adds the segments'
  partial sums with their decays. Each key chunk then gathers the dS of the ≤ log(T/C) nodes
  that contain it (``_bwd_inter_k``). The intra-chunk terms (``_bwd_intra``) and the query
  side (``_bwd_inter_q``) are separate kernels so that no kernel holds more than a few
  64×64 tiles live (one fused kernel spilled registers badly).
* dg comes from ``dG_t = q_t·dq_t − k_t·dk_t`` (per value head) and a reverse cumsum, so it
  costs no pass of its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _intra_weights, _level_lambda


@triton.jit
def _dstate(
    q, do, g, lam, dstate, partial, totals, hoff,
    T, NT, NNODES, NSEG, BH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    SEG: tl.constexpr, LOG2SEG: tl.constexpr, LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    i_sv, hh, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    for c in range(c_lo, c_hi):
        if (c >> hh) & 1:
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
            acc += tl.dot(tl.trans((qq.to(tl.float32) * f[:, None]).to(qq.dtype)), dd, input_precision=PREC)
            dec += tl.load(totals + base + c)
            last = ((c + 1) & (span - 1)) == 0
            if last | (c == c_hi - 1):
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


@triton.jit
def _bwd_intra(
    q, k, v, g, lam, do, dq, dk, dv, dlam,
    T, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LP: tl.constexpr,
    LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of the intra-chunk block: dq, dk, dv (fp32, per value head) and dλ of the
    in-chunk levels (masked row sums of s·decay·dp, grouped by level)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    cl = tl.arange(0, LP)
    qk_off = ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :]
    vo_off = ((b * T + rows[:, None]) * H + h) * V + cv[None, :]
    qq = tl.load(q + qk_off, mask=rmask[:, None], other=0.0)
    kk = tl.load(k + qk_off, mask=rmask[:, None], other=0.0)
    vv = tl.load(v + vo_off, mask=rmask[:, None], other=0.0)
    dd = tl.load(do + vo_off, mask=rmask[:, None], other=0.0)
    gc = tl.cumsum(tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0), 0)
    lrow = lam + b * slb + rows * slt + h * slh

    s = tl.dot(qq, tl.trans(kk), input_precision=PREC) * scale
    dp = tl.dot(dd, tl.trans(vv), input_precision=PREC)
    w = _intra_weights(gc, lrow, rmask, L, sl, C, LOG2C)
    dv_acc = tl.dot(tl.trans((s * w).to(dd.dtype)), dd, input_precision=PREC)
    hv_off = ((b * T + rows[:, None]) * H + h) * V + cv[None, :]
    tl.store(dv + hv_off, dv_acc, mask=rmask[:, None])
    ds = (dp * w * scale).to(qq.dtype)
    hk_off = ((b * T + rows[:, None]) * H + h) * K + ck[None, :]
    tl.store(dq + hk_off, tl.dot(ds, kk, input_precision=PREC), mask=rmask[:, None])
    tl.store(dk + hk_off, tl.dot(tl.trans(ds), qq, input_precision=PREC), mask=rmask[:, None])

    ii = tl.arange(0, C)[:, None]
    jj = tl.arange(0, C)[None, :]
    causal = ii >= jj
    sdp = s * dp * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    x = ii ^ jj
    dl_acc = tl.where(cl[None, :] == 0, tl.sum(tl.where(ii == jj, sdp, 0.0), 1)[:, None], 0.0)
    for lev in tl.static_range(1, LOG2C + 1):
        r = tl.sum(tl.where(((x >> (lev - 1)) == 1) & causal, sdp, 0.0), 1)
        dl_acc += tl.where(cl[None, :] == tl.minimum(lev, L - 1), r[:, None], 0.0)
    tl.store(dlam + ((b * T + rows[:, None]) * H + h) * L + cl[None, :], dl_acc, mask=rmask[:, None] & (cl[None, :] < L))


@triton.jit
def _bwd_inter_q(
    q, g, lam, do, nodes, totals, hoff, dq, dlam,
    T, NNODES, NH, L, scale,
    slb, slt, slh, sl,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LP: tl.constexpr,
    LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    """Query side of the inter-chunk levels: for each set bit of the chunk index, the node
    the forward read adds to dq and to dλ of that level (adds to the intra results)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    cl = tl.arange(0, LP)
    qq = tl.load(q + ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :], mask=rmask[:, None], other=0.0)
    dd = tl.load(do + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], mask=rmask[:, None], other=0.0)
    gc = tl.cumsum(tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0), 0)
    lrow = lam + b * slb + rows * slt + h * slh
    hk_off = ((b * T + rows[:, None]) * H + h) * K + ck[None, :]
    dl_off = ((b * T + rows[:, None]) * H + h) * L + cl[None, :]
    dl_mask = rmask[:, None] & (cl[None, :] < L)
    dq_acc = tl.zeros([C, K], dtype=tl.float32)
    dl_acc = tl.zeros([C, LP], dtype=tl.float32)
    base = i_bh * NNODES
    dec = 0.0
    for hh in range(0, NH):
        n = i_t >> hh
        if n & 1:
            node = base + tl.load(hoff + hh) + n - 1
            st = tl.load(nodes + (node * K + ck[:, None]) * V + cv[None, :]).to(qq.dtype)
            e = tl.exp(gc + dec) * scale
            lam_l = _level_lambda(lrow, rmask, LOG2C + 1 + hh, L, sl)
            dq_acc += (lam_l * e)[:, None] * tl.dot(dd, tl.trans(st), input_precision=PREC)
            r_q = e * tl.sum(dd.to(tl.float32) * tl.dot(qq, st, input_precision=PREC), 1)
            dl_acc += tl.where(cl[None, :] == tl.minimum(LOG2C + 1 + hh, L - 1), r_q[:, None], 0.0)
            dec += tl.load(totals + node)
    tl.store(dq + hk_off, tl.load(dq + hk_off, mask=rmask[:, None], other=0.0) + dq_acc, mask=rmask[:, None])
    tl.store(dlam + dl_off, tl.load(dlam + dl_off, mask=dl_mask, other=0.0) + dl_acc, mask=dl_mask)


@triton.jit
def _bwd_inter_k(
    q, k, v, g, dstate, totals, hoff, nsizes, dq, dk, dv, dgs,
    T, NT, NNODES, NH,
    H: tl.constexpr, HG: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
):
    """Key side of the inter-chunk levels: for each clear bit of the chunk index, the state
    gradient of the node holding this chunk adds to dk and dv. Last, dG = q·dq − k·dk."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    rows = i_t * C + tl.arange(0, C)
    rmask = rows < T
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    qk_off = ((b * T + rows[:, None]) * G + h // HG) * K + ck[None, :]
    kk = tl.load(k + qk_off, mask=rmask[:, None], other=0.0)
    vv = tl.load(v + ((b * T + rows[:, None]) * H + h) * V + cv[None, :], mask=rmask[:, None], other=0.0)
    gg = tl.load(g + (b * T + rows) * H + h, mask=rmask, other=0.0)
    gc = tl.cumsum(gg, 0)
    tot = tl.sum(gg, 0)
    dk_acc = tl.zeros([C, K], dtype=tl.float32)
    dv_acc = tl.zeros([C, V], dtype=tl.float32)
    base = i_bh * NNODES
    dec = 0.0  # log-decay from the end of this chunk to the end of the node at this height
    for hh in range(0, NH):
        n = i_t >> hh
        if (n & 1) == 0:
            off = tl.load(hoff + hh)
            if ((n + 1) << hh) < NT:
                dst = tl.load(dstate + ((base + off + n) * K + ck[:, None]) * V + cv[None, :]).to(kk.dtype)
                e2 = tl.exp(tot - gc + dec)
                dk_acc += e2[:, None] * tl.dot(vv, tl.trans(dst), input_precision=PREC)
                dv_acc += e2[:, None] * tl.dot(kk, dst, input_precision=PREC)
            if n + 1 < tl.load(nsizes + hh):
                dec += tl.load(totals + base + off + n + 1)
    hk_off = ((b * T + rows[:, None]) * H + h) * K + ck[None, :]
    hv_off = ((b * T + rows[:, None]) * H + h) * V + cv[None, :]
    dk_acc += tl.load(dk + hk_off, mask=rmask[:, None], other=0.0)
    tl.store(dk + hk_off, dk_acc, mask=rmask[:, None])
    tl.store(dv + hv_off, tl.load(dv + hv_off, mask=rmask[:, None], other=0.0) + dv_acc, mask=rmask[:, None])
    qq = tl.load(q + qk_off, mask=rmask[:, None], other=0.0).to(tl.float32)
    dqq = tl.load(dq + hk_off, mask=rmask[:, None], other=0.0)
    dg = tl.sum(qq * dqq - kk.to(tl.float32) * dk_acc, 1)
    tl.store(dgs + (b * T + rows) * H + h, dg, mask=rmask)
