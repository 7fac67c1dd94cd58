"""The Triton kernels of models/triton_ttt.py (imported only when they are used): the chunk steps of
TTT-Linear and TTT-MLP in the dual form, forward and backward. See triton_ttt.py for the equations."""
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
def _ttt_linear_fwd(W0, B0, Q, K, TGT, MIX, SLR, LNW, LNB, OUT, GS, WS, BS_, WN, BN, N, BH, eps,
                    BLK: tl.constexpr, D: tl.constexpr, EVERY: tl.constexpr):
    """Stores G_i of every mini-batch and W̃_i only every EVERY mini-batches (the backward recovers the rest)."""
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
        if i % EVERY == 0:
            anchor = (i // EVERY) * BH + bh
            tl.store(WS + anchor * D * D + cc, w)
            tl.store(BS_ + anchor * D + c, bias)
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        z = tl.dot(k, w, input_precision="ieee") + bias[None, :]
        g, xh, rstd, gh = _ln_l2_grad(z, t, lnw, lnb, eps, D)
        tl.store(GS + step * BLK * D + rc, g)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        out = tl.dot(q, w, input_precision="ieee") + bias[None, :] - tl.dot(mix, g, input_precision="ieee")
        tl.store(OUT + step * BLK * D + rc, out.to(OUT.dtype.element_ty))
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        w = w - tl.dot(tl.trans(k * slr[:, None]), g, input_precision="ieee")
        bias = bias - tl.sum(g * slr[:, None], 0)
    tl.store(WN + bh * D * D + cc, w)
    tl.store(BN + bh * D + c, bias)

@triton.jit
def _ttt_linear_bwd(GS, WS, BS_, WN, BN, Q, K, TGT, MIX, SLR, LNW, LNB, DOUT, DWN, DBN,
                    DW0, DB0, DQ, DK, DTGT, DMIX, DSLR, DLNW, DLNB, N, BH, eps,
                    BLK: tl.constexpr, D: tl.constexpr, EVERY: tl.constexpr):
    """Walks the mini-batches in reverse from W̃_N: W̃_i = W̃_{i+1} + D_i G_i with the stored G_i, reloaded at
    the kept W̃_i (every EVERY mini-batches), then Z_i and the LN-L2 parts recomputed from W̃_i."""
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
    w = tl.load(WN + bh * D * D + cc)
    bias = tl.load(BN + bh * D + c)
    for j in range(N):
        i = N - 1 - j
        step = i * BH + bh
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        if i % EVERY == 0:
            anchor = (i // EVERY) * BH + bh
            w = tl.load(WS + anchor * D * D + cc)
            bias = tl.load(BS_ + anchor * D + c)
        else:  # undo the update of mini-batch i
            g_i = tl.load(GS + step * BLK * D + rc)
            w = w + tl.dot(tl.trans(k * slr[:, None]), g_i, input_precision="ieee")
            bias = bias + tl.sum(g_i * slr[:, None], 0)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        z = tl.dot(k, w, input_precision="ieee") + bias[None, :]
        g, xh, rstd, gh = _ln_l2_grad(z, t, lnw, lnb, eps, D)
        do = tl.load(DOUT + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
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
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        aw += tl.dot(tl.trans(k), dz, input_precision="ieee") + tl.dot(tl.trans(q), do, input_precision="ieee")
        ab += tl.sum(dz, 0) + tl.sum(do, 0)
    tl.store(DW0 + bh * D * D + cc, aw)
    tl.store(DB0 + bh * D + c, ab)
    tl.store(DLNW + bh * D + c, d_lnw)
    tl.store(DLNB + bh * D + c, d_lnb)


# ------------------------------------------------------------------------------------- TTT-MLP


@triton.jit
def _gelu_parts(x):
    """gelu(x), gelu'(x), gelu''(x) of the tanh form from one tanh (as ttt_fused._gelu_parts and _gelu_second)."""
    x2 = x * x
    u = 0.79788456 * x * (1 + 0.044715 * x2)
    t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u)
    du = 0.79788456 + 0.1070322243 * x2
    sech2 = 1 - t * t
    half_1t = 0.5 * (1 + t)
    d1 = 0.5 * x * (sech2 * du) + half_1t
    d2 = sech2 * (du + 0.5 * x * (2 * 0.1070322243 * x - 2 * t * du * du))
    return x * half_1t, d1, d2


@triton.jit
def _ttt_mlp_fwd(W10, B10, W20, B20, Q, K, TGT, ETA, MIX, SLR, LNW, LNB, OUT, G1S, G2S, W1S, B1S, W2S, B2S,
                 W1N, B1N, W2N, B2N, N, BH, eps, BLK: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                 EVERY: tl.constexpr):
    """Stores G1_i, G2_i of every mini-batch and the weights only every EVERY mini-batches."""
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    e = tl.arange(0, HD)
    rc = r[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    ce = c[:, None] * HD + e[None, :]  # [D, HD]
    ec = e[:, None] * D + c[None, :]  # [HD, D]
    re = r[:, None] * HD + e[None, :]  # [BLK, HD]
    w1 = tl.load(W10 + bh * D * HD + ce).to(tl.float32)
    b1 = tl.load(B10 + bh * HD + e).to(tl.float32)
    w2 = tl.load(W20 + bh * HD * D + ec).to(tl.float32)
    b2 = tl.load(B20 + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    for i in range(N):
        step = i * BH + bh
        if i % EVERY == 0:
            anchor = (i // EVERY) * BH + bh
            tl.store(W1S + anchor * D * HD + ce, w1)
            tl.store(B1S + anchor * HD + e, b1)
            tl.store(W2S + anchor * HD * D + ec, w2)
            tl.store(B2S + anchor * D + c, b2)
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        z1 = tl.dot(k, w1, input_precision="ieee") + b1[None, :]
        x2, gp, gpp = _gelu_parts(z1)
        z2 = tl.dot(x2, w2, input_precision="ieee") + b2[None, :]
        g2, xh, rstd, gh = _ln_l2_grad(z2, t, lnw, lnb, eps, D)
        g1 = tl.dot(g2, tl.trans(w2), input_precision="ieee") * gp
        tl.store(G1S + step * BLK * HD + re, g1)
        tl.store(G2S + step * BLK * D + rc, g2)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        eta = tl.load(ETA + step * BLK * BLK + rr).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        z1bar = tl.dot(q, w1, input_precision="ieee") + b1[None, :] - tl.dot(mix, g1, input_precision="ieee")
        x2bar, gpb, gppb = _gelu_parts(z1bar)
        s = eta * (tl.dot(x2bar, tl.trans(x2), input_precision="ieee") + 1.0)
        out = tl.dot(x2bar, w2, input_precision="ieee") + b2[None, :] - tl.dot(s, g2, input_precision="ieee")
        tl.store(OUT + step * BLK * D + rc, out)
        w1 = w1 - tl.dot(tl.trans(k * slr[:, None]), g1, input_precision="ieee")
        b1 = b1 - tl.sum(g1 * slr[:, None], 0)
        w2 = w2 - tl.dot(tl.trans(x2 * slr[:, None]), g2, input_precision="ieee")
        b2 = b2 - tl.sum(g2 * slr[:, None], 0)
    tl.store(W1N + bh * D * HD + ce, w1)
    tl.store(B1N + bh * HD + e, b1)
    tl.store(W2N + bh * HD * D + ec, w2)
    tl.store(B2N + bh * D + c, b2)


@triton.jit
def _ttt_mlp_bwd(G1S, G2S, W1S, B1S, W2S, B2S, W1N, B1N, W2N, B2N, Q, K, TGT, ETA, MIX, SLR, LNW, LNB, DOUT,
                 DW1N, DB1N, DW2N, DB2N, DW10, DB10, DW20, DB20, DQ, DK, DTGT, DETA, DMIX, DSLR, DLNW, DLNB, N, BH,
                 eps, BLK: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, EVERY: tl.constexpr):
    """Walks back from the final weights as _ttt_linear_bwd: W̃1_i = W̃1_{i+1} + (s_b η ⊙ K̃)ᵀ G1_i, then
    X2_i from W̃1_i and W̃2_i = W̃2_{i+1} + (s_b η ⊙ X̃2)ᵀ G2_i; the kept weights reloaded every EVERY."""
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    e = tl.arange(0, HD)
    rc = r[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    ce = c[:, None] * HD + e[None, :]
    ec = e[:, None] * D + c[None, :]
    re = r[:, None] * HD + e[None, :]
    a_w1 = tl.load(DW1N + bh * D * HD + ce).to(tl.float32)  # ∂L/∂(weights after the current mini-batch)
    a_b1 = tl.load(DB1N + bh * HD + e).to(tl.float32)
    a_w2 = tl.load(DW2N + bh * HD * D + ec).to(tl.float32)
    a_b2 = tl.load(DB2N + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    d_lnw = tl.zeros([D], dtype=tl.float32)
    d_lnb = tl.zeros([D], dtype=tl.float32)
    w1 = tl.load(W1N + bh * D * HD + ce)
    b1 = tl.load(B1N + bh * HD + e)
    w2 = tl.load(W2N + bh * HD * D + ec)
    b2 = tl.load(B2N + bh * D + c)
    for j in range(N):
        i = N - 1 - j
        step = i * BH + bh
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        anchor = (i // EVERY) * BH + bh
        if i % EVERY == 0:
            w1 = tl.load(W1S + anchor * D * HD + ce)
            b1 = tl.load(B1S + anchor * HD + e)
        else:  # undo the update of mini-batch i (layer 1)
            g1_i = tl.load(G1S + step * BLK * HD + re)
            w1 = w1 + tl.dot(tl.trans(k * slr[:, None]), g1_i, input_precision="ieee")
            b1 = b1 + tl.sum(g1_i * slr[:, None], 0)
        # recompute the forward of this mini-batch
        z1 = tl.dot(k, w1, input_precision="ieee") + b1[None, :]
        x2, gp, gpp = _gelu_parts(z1)
        if i % EVERY == 0:
            w2 = tl.load(W2S + anchor * HD * D + ec)
            b2 = tl.load(B2S + anchor * D + c)
        else:  # layer 2, with X2 of the recovered W̃1_i
            g2_i = tl.load(G2S + step * BLK * D + rc)
            w2 = w2 + tl.dot(tl.trans(x2 * slr[:, None]), g2_i, input_precision="ieee")
            b2 = b2 + tl.sum(g2_i * slr[:, None], 0)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        eta = tl.load(ETA + step * BLK * BLK + rr).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        do = tl.load(DOUT + step * BLK * D + rc).to(tl.float32)
        z2 = tl.dot(x2, w2, input_precision="ieee") + b2[None, :]
        g2, xh, rstd, gh = _ln_l2_grad(z2, t, lnw, lnb, eps, D)
        m_ = tl.dot(g2, tl.trans(w2), input_precision="ieee")
        g1 = m_ * gp
        z1bar = tl.dot(q, w1, input_precision="ieee") + b1[None, :] - tl.dot(mix, g1, input_precision="ieee")
        x2bar, gpb, gppb = _gelu_parts(z1bar)
        p = tl.dot(x2bar, tl.trans(x2), input_precision="ieee") + 1.0
        s = eta * p
        # reads: out = X̄2 W2 + b2 − S G2
        dw2 = a_w2 + tl.dot(tl.trans(x2bar), do, input_precision="ieee")
        db2 = a_b2 + tl.sum(do, 0)
        ds = -tl.dot(do, tl.trans(g2), input_precision="ieee")
        dg2 = -tl.dot(tl.trans(s), do, input_precision="ieee")
        dp = eta * ds
        tl.store(DETA + step * BLK * BLK + rr, ds * p)
        dx2bar = tl.dot(do, tl.trans(w2), input_precision="ieee") + tl.dot(dp, x2, input_precision="ieee")
        dx2 = tl.dot(tl.trans(dp), x2bar, input_precision="ieee")
        dz1bar = dx2bar * gpb
        tl.store(DMIX + step * BLK * BLK + rr, -tl.dot(dz1bar, tl.trans(g1), input_precision="ieee"))
        dg1 = -tl.dot(tl.trans(mix), dz1bar, input_precision="ieee")
        # updates: W1' = W1 − (s η K)ᵀ G1, b1' = b1 − Σ s η G1; same for W2, b2 with X2, G2
        ga1 = tl.dot(g1, tl.trans(a_w1), input_precision="ieee")
        ga2 = tl.dot(g2, tl.trans(a_w2), input_precision="ieee")
        dg1 += -slr[:, None] * (tl.dot(k, a_w1, input_precision="ieee") + a_b1[None, :])
        dg2 += -slr[:, None] * (tl.dot(x2, a_w2, input_precision="ieee") + a_b2[None, :])
        dx2 += -slr[:, None] * ga2
        tl.store(DSLR + step * BLK + r, -tl.sum(k * ga1, 1) - tl.sum(g1 * a_b1[None, :], 1)
                 - tl.sum(x2 * ga2, 1) - tl.sum(g2 * a_b2[None, :], 1))
        # G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)
        dm = dg1 * gp
        dz1 = dg1 * m_ * gpp
        dg2 += tl.dot(dm, w2, input_precision="ieee")
        dw2 += tl.dot(tl.trans(dm), g2, input_precision="ieee")
        # G2 = ∇LN-L2(Z2): LayerNorm backward
        gx = tl.sum(dg2 * xh, 1) / D
        a = (dg2 - (tl.sum(dg2, 1) / D)[:, None] - xh * gx[:, None]) * rstd[:, None]
        mm = tl.sum(gh * xh, 1) / D
        dxh = lnw[None, :] * lnw[None, :] * a - (mm[:, None] * dg2 + gx[:, None] * gh) * rstd[:, None]
        dstd = tl.sum(dg2 * g2, 1) + tl.sum(dxh * xh, 1)
        dz2 = (dxh - (tl.sum(dxh, 1) / D)[:, None]) * rstd[:, None] - (dstd * rstd / D)[:, None] * xh
        tl.store(DTGT + step * BLK * D + rc, -lnw[None, :] * a)
        d_lnw += tl.sum(a * (2.0 * lnw[None, :] * xh + lnb[None, :] - t), 0)
        d_lnb += tl.sum(lnw[None, :] * a, 0)
        # Z2 = X2 W2 + b2, X2 = gelu(Z1), Z1 = K W1 + b1, Z̄1 = Q W1 + b1 − mix G1
        dw2 += tl.dot(tl.trans(x2), dz2, input_precision="ieee")
        db2 += tl.sum(dz2, 0)
        dx2 += tl.dot(dz2, tl.trans(w2), input_precision="ieee")
        dz1 += dx2 * gp
        tl.store(DK + step * BLK * D + rc, tl.dot(dz1, tl.trans(w1), input_precision="ieee")
                 - slr[:, None] * ga1)
        tl.store(DQ + step * BLK * D + rc, tl.dot(dz1bar, tl.trans(w1), input_precision="ieee"))
        a_w1 += tl.dot(tl.trans(k), dz1, input_precision="ieee") + tl.dot(tl.trans(q), dz1bar, input_precision="ieee")
        a_b1 += tl.sum(dz1, 0) + tl.sum(dz1bar, 0)
        a_w2 = dw2
        a_b2 = db2
    tl.store(DW10 + bh * D * HD + ce, a_w1)
    tl.store(DB10 + bh * HD + e, a_b1)
    tl.store(DW20 + bh * HD * D + ec, a_w2)
    tl.store(DB20 + bh * D + c, a_b2)
    tl.store(DLNW + bh * D + c, d_lnw)
    tl.store(DLNB + bh * D + c, d_lnb)
