"""The Triton kernels of models/triton_ttt.py (imported only when they are used): the chunk step of
TTT-Linear in the dual form, forward and backward. See triton_ttt.py for the equations."""
import triton
import triton.language as tl


@triton.jit
def _ln_l2_grad(z, t, lnw, lnb, eps, D: tl.constexpr):
    """g = ∇_z ½‖γ LN(z) + β − t‖² per row, with x̂, 1/σ, ĝ."""
    mu = tl.sum(z, 1) / D
    xc = z - mu[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    xh = xc * rstd[:, None]
    gh = (lnw[None, :] * xh + lnb[None, :] - t) * lnw[None, :]
    g = (gh - (tl.sum(gh, 1) / D)[:, None] - xh * (tl.sum(gh * xh, 1) / D)[:, None]) * rstd[:, None]
    return g, xh, rstd, gh

@triton.jit
def _ttt_linear_fwd(W0, B0, Q, K, TGT, MIX, SLR, LNW, LNB, OUT, WS, BS_, WN, BN, N, BH, eps,
                    BLK: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    rc = r[:, None] * D + c[None, :]
    cc = c[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    w = tl.load(W0 + bh * D * D + cc).to(tl.float32)
    bias = tl.load(B0 + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    for i in range(N):
        step = i * BH + bh
        tl.store(WS + step * D * D + cc, w)
        tl.store(BS_ + step * D + c, bias)
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        z = tl.dot(k, w, input_precision="ieee") + bias[None, :]
        g, xh, rstd, gh = _ln_l2_grad(z, t, lnw, lnb, eps, D)
        out = tl.dot(q, w, input_precision="ieee") + bias[None, :] - tl.dot(mix, g, input_precision="ieee")
        tl.store(OUT + step * BLK * D + rc, out.to(OUT.dtype.element_ty))
        w = w - tl.dot(tl.trans(k * slr[:, None]), g, input_precision="ieee")
        bias = bias - tl.sum(g * slr[:, None], 0)
    tl.store(WN + bh * D * D + cc, w)
    tl.store(BN + bh * D + c, bias)

@triton.jit
def _ttt_linear_bwd(WS, BS_, Q, K, TGT, MIX, SLR, LNW, LNB, DOUT, DWN, DBN,
                    DW0, DB0, DQ, DK, DTGT, DMIX, DSLR, DLNW, DLNB, N, BH, eps,
                    BLK: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    rc = r[:, None] * D + c[None, :]
    cc = c[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    aw = tl.load(DWN + bh * D * D + cc).to(tl.float32)  # ∂L/∂W after the current mini-batch
    ab = tl.load(DBN + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    d_lnw = tl.zeros([D], dtype=tl.float32)
    d_lnb = tl.zeros([D], dtype=tl.float32)
    for j in range(N):
        step = (N - 1 - j) * BH + bh
        w = tl.load(WS + step * D * D + cc)
        bias = tl.load(BS_ + step * D + c)
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        do = tl.load(DOUT + step * BLK * D + rc).to(tl.float32)
        z = tl.dot(k, w, input_precision="ieee") + bias[None, :]
        g, xh, rstd, gh = _ln_l2_grad(z, t, lnw, lnb, eps, D)
        tl.store(DMIX + step * BLK * BLK + rr, -tl.dot(do, tl.trans(g), input_precision="ieee"))
        ga = tl.dot(g, tl.trans(aw), input_precision="ieee")
        tl.store(DSLR + step * BLK + r, -tl.sum(k * ga, 1) - tl.sum(g * ab[None, :], 1))
        dg = (-tl.dot(tl.trans(mix), do, input_precision="ieee")
              - slr[:, None] * (tl.dot(k, aw, input_precision="ieee") + ab[None, :]))
        # LayerNorm backward of g(z): a = ∂L/∂ĝ, then through x̂ and σ
        gx = tl.sum(dg * xh, 1) / D
        a = (dg - (tl.sum(dg, 1) / D)[:, None] - xh * gx[:, None]) * rstd[:, None]
        m = tl.sum(gh * xh, 1) / D
        dxh = lnw[None, :] * lnw[None, :] * a - (m[:, None] * dg + gx[:, None] * gh) * rstd[:, None]
        dstd = tl.sum(dg * g, 1) + tl.sum(dxh * xh, 1)
        dz = (dxh - (tl.sum(dxh, 1) / D)[:, None]) * rstd[:, None] - (dstd * rstd / D)[:, None] * xh
        tl.store(DTGT + step * BLK * D + rc, -lnw[None, :] * a)
        d_lnw += tl.sum(a * (2.0 * lnw[None, :] * xh + lnb[None, :] - t), 0)
        d_lnb += tl.sum(lnw[None, :] * a, 0)
        tl.store(DK + step * BLK * D + rc,
                 tl.dot(dz, tl.trans(w), input_precision="ieee") - slr[:, None] * ga)
        tl.store(DQ + step * BLK * D + rc, tl.dot(do, tl.trans(w), input_precision="ieee"))
        aw += tl.dot(tl.trans(k), dz, input_precision="ieee") + tl.dot(tl.trans(q), do, input_precision="ieee")
        ab += tl.sum(dz, 0) + tl.sum(do, 0)
    tl.store(DW0 + bh * D * D + cc, aw)
    tl.store(DB0 + bh * D + c, ab)
    tl.store(DLNW + bh * D + c, d_lnw)
    tl.store(DLNB + bh * D + c, d_lnb)
