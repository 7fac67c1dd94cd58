"""The Triton kernels of models/ops/ttt/triton.py (imported only when they are used): the chunk steps of
TTT-Linear and TTT-MLP in the dual form, forward and backward. See triton.py for the equations."""
try:  # transformers' import check of an exported folder skips try blocks; triton.py imports this module
    # only where triton is installed (its AVAILABLE), so loading a folder never needs triton
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("the Triton kernels need triton (ops/<family>/triton.py imports them only where it is installed)") from e


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
    """gelu(x), gelu'(x), gelu''(x) of the tanh form from one tanh (as ops.ttt.fused._gelu_parts and _gelu_second)."""
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
def _ttt_mlp_fwd(Q, K, TGT, ETA, MIX, SLR, LNW, LNB, OUT, G1S, G2S, W1S, B1S, W2S, B2S,
                 W1, B1, W2, B2, N, BH, eps, BLK: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                 EVERY: tl.constexpr):
    """W1, B1, W2, B2 hold the initial weights and are updated in place (the final weights at the end). The
    two [D, HD] weight tiles stay in global memory (L2) and are loaded where used, so no weight tile lives
    across a mini-batch in registers. Stores G1_i, G2_i of every mini-batch and the weights every EVERY."""
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    e = tl.arange(0, HD)
    rc = r[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    re = r[:, None] * HD + e[None, :]  # [BLK, HD]
    w1p = W1 + bh * D * HD + c[:, None] * HD + e[None, :]  # [D, HD]
    w2p = W2 + bh * HD * D + e[:, None] * D + c[None, :]  # [HD, D]
    b1 = tl.load(B1 + bh * HD + e).to(tl.float32)
    b2 = tl.load(B2 + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    for i in range(N):
        step = i * BH + bh
        if i % EVERY == 0:
            anchor = (i // EVERY) * BH + bh
            tl.store(W1S + anchor * D * HD + c[:, None] * HD + e[None, :], tl.load(w1p))
            tl.store(B1S + anchor * HD + e, b1)
            tl.store(W2S + anchor * HD * D + e[:, None] * D + c[None, :], tl.load(w2p))
            tl.store(B2S + anchor * D + c, b2)
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        z1 = tl.dot(k, tl.load(w1p), input_precision="ieee") + b1[None, :]
        x2, gp, gpp = _gelu_parts(z1)
        w2 = tl.load(w2p)
        z2 = tl.dot(x2, w2, input_precision="ieee") + b2[None, :]
        g2, xh, rstd, gh = _ln_l2_grad(z2, t, lnw, lnb, eps, D)
        g1 = tl.dot(g2, tl.trans(w2), input_precision="ieee") * gp
        tl.store(G1S + step * BLK * HD + re, g1)
        tl.store(G2S + step * BLK * D + rc, g2)
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        z1bar = tl.dot(q, tl.load(w1p), input_precision="ieee") + b1[None, :] - tl.dot(mix, g1, input_precision="ieee")
        x2bar, gpb, gppb = _gelu_parts(z1bar)
        eta = tl.load(ETA + step * BLK * BLK + rr).to(tl.float32)
        s = eta * (tl.dot(x2bar, tl.trans(x2), input_precision="ieee") + 1.0)
        out = tl.dot(x2bar, tl.load(w2p), input_precision="ieee") + b2[None, :] - tl.dot(s, g2, input_precision="ieee")
        tl.store(OUT + step * BLK * D + rc, out)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        tl.debug_barrier()  # every read of this mini-batch's weights is done before they are updated
        tl.store(w1p, tl.load(w1p) - tl.dot(tl.trans(k * slr[:, None]), g1, input_precision="ieee"))
        b1 = b1 - tl.sum(g1 * slr[:, None], 0)
        tl.store(w2p, tl.load(w2p) - tl.dot(tl.trans(x2 * slr[:, None]), g2, input_precision="ieee"))
        b2 = b2 - tl.sum(g2 * slr[:, None], 0)
        tl.debug_barrier()  # the updated weights are visible to every thread of the program
    tl.store(B1 + bh * HD + e, b1)
    tl.store(B2 + bh * D + c, b2)


@triton.jit
def _ttt_mlp_bwd(G1S, G2S, W1S, B1S, W2S, B2S, W1, B1, W2, B2, Q, K, TGT, ETA, MIX, SLR, LNW, LNB, DOUT,
                 DW1, DB1, DW2, DB2, DQ, DK, DTGT, DETA, DMIX, DSLR, DLNW, DLNB, N, BH,
                 eps, BLK: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, EVERY: tl.constexpr):
    """Walks back from the final weights (W1, B1, W2, B2, recovered in place) as _ttt_linear_bwd:
    W̃1_i = W̃1_{i+1} + (s_b η ⊙ K̃)ᵀ G1_i, then X2_i from W̃1_i and W̃2_i = W̃2_{i+1} + (s_b η ⊙ X̃2)ᵀ G2_i; the
    kept weights reloaded every EVERY. DW1, DB1, DW2, DB2 hold ∂L/∂(final weights) and accumulate in place
    to ∂L/∂(initial weights); weight-sized tiles live in global memory (L2) as in _ttt_mlp_fwd."""
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    c = tl.arange(0, D)
    e = tl.arange(0, HD)
    rc = r[:, None] * D + c[None, :]
    rr = r[:, None] * BLK + r[None, :]
    re = r[:, None] * HD + e[None, :]
    ce = c[:, None] * HD + e[None, :]
    ec = e[:, None] * D + c[None, :]
    w1p, w2p = W1 + bh * D * HD + ce, W2 + bh * HD * D + ec
    a1p, a2p = DW1 + bh * D * HD + ce, DW2 + bh * HD * D + ec  # ∂L/∂(weights after the current mini-batch)
    b1 = tl.load(B1 + bh * HD + e)
    b2 = tl.load(B2 + bh * D + c)
    a_b1 = tl.load(DB1 + bh * HD + e).to(tl.float32)
    a_b2 = tl.load(DB2 + bh * D + c).to(tl.float32)
    lnw = tl.load(LNW + bh * D + c).to(tl.float32)
    lnb = tl.load(LNB + bh * D + c).to(tl.float32)
    d_lnw = tl.zeros([D], dtype=tl.float32)
    d_lnb = tl.zeros([D], dtype=tl.float32)
    for j in range(N):
        i = N - 1 - j
        step = i * BH + bh
        k = tl.load(K + step * BLK * D + rc).to(tl.float32)
        slr = tl.load(SLR + step * BLK + r).to(tl.float32)
        anchor = (i // EVERY) * BH + bh
        if i % EVERY == 0:
            tl.store(w1p, tl.load(W1S + anchor * D * HD + ce))
            b1 = tl.load(B1S + anchor * HD + e)
        else:  # undo the update of mini-batch i (layer 1)
            g1_i = tl.load(G1S + step * BLK * HD + re)
            tl.store(w1p, tl.load(w1p) + tl.dot(tl.trans(k * slr[:, None]), g1_i, input_precision="ieee"))
            b1 = b1 + tl.sum(g1_i * slr[:, None], 0)
        tl.debug_barrier()
        # recompute the forward of this mini-batch
        z1 = tl.dot(k, tl.load(w1p), input_precision="ieee") + b1[None, :]
        x2, gp, gpp = _gelu_parts(z1)
        if i % EVERY == 0:
            tl.store(w2p, tl.load(W2S + anchor * HD * D + ec))
            b2 = tl.load(B2S + anchor * D + c)
        else:  # layer 2, with X2 of the recovered W̃1_i
            g2_i = tl.load(G2S + step * BLK * D + rc)
            tl.store(w2p, tl.load(w2p) + tl.dot(tl.trans(x2 * slr[:, None]), g2_i, input_precision="ieee"))
            b2 = b2 + tl.sum(g2_i * slr[:, None], 0)
        tl.debug_barrier()
        t = tl.load(TGT + step * BLK * D + rc).to(tl.float32)
        w2 = tl.load(w2p)
        z2 = tl.dot(x2, w2, input_precision="ieee") + b2[None, :]
        g2, xh, rstd, gh = _ln_l2_grad(z2, t, lnw, lnb, eps, D)
        m_ = tl.dot(g2, tl.trans(w2), input_precision="ieee")
        g1 = m_ * gp
        q = tl.load(Q + step * BLK * D + rc).to(tl.float32)
        mix = tl.load(MIX + step * BLK * BLK + rr).to(tl.float32)
        z1bar = tl.dot(q, tl.load(w1p), input_precision="ieee") + b1[None, :] - tl.dot(mix, g1, input_precision="ieee")
        x2bar, gpb, gppb = _gelu_parts(z1bar)
        p = tl.dot(x2bar, tl.trans(x2), input_precision="ieee") + 1.0
        eta = tl.load(ETA + step * BLK * BLK + rr).to(tl.float32)
        do = tl.load(DOUT + step * BLK * D + rc).to(tl.float32)
        # reads: out = X̄2 W2 + b2 − S G2
        ds = -tl.dot(do, tl.trans(g2), input_precision="ieee")
        dg2 = -tl.dot(tl.trans(eta * p), do, input_precision="ieee")
        dp = eta * ds
        tl.store(DETA + step * BLK * BLK + rr, ds * p)
        dx2bar = tl.dot(do, tl.trans(tl.load(w2p)), input_precision="ieee") + tl.dot(dp, x2, input_precision="ieee")
        dx2 = tl.dot(tl.trans(dp), x2bar, input_precision="ieee")
        dz1bar = dx2bar * gpb
        tl.store(DMIX + step * BLK * BLK + rr, -tl.dot(dz1bar, tl.trans(g1), input_precision="ieee"))
        dg1 = -tl.dot(tl.trans(mix), dz1bar, input_precision="ieee")
        # updates: W1' = W1 − (s η K)ᵀ G1, b1' = b1 − Σ s η G1; same for W2, b2 with X2, G2
        a_w1 = tl.load(a1p)
        ga1 = tl.dot(g1, tl.trans(a_w1), input_precision="ieee")
        dg1 += -slr[:, None] * (tl.dot(k, a_w1, input_precision="ieee") + a_b1[None, :])
        a_w2 = tl.load(a2p)
        ga2 = tl.dot(g2, tl.trans(a_w2), input_precision="ieee")
        dg2 += -slr[:, None] * (tl.dot(x2, a_w2, input_precision="ieee") + a_b2[None, :])
        dx2 += -slr[:, None] * ga2
        tl.store(DSLR + step * BLK + r, -tl.sum(k * ga1, 1) - tl.sum(g1 * a_b1[None, :], 1)
                 - tl.sum(x2 * ga2, 1) - tl.sum(g2 * a_b2[None, :], 1))
        # G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)
        dm = dg1 * gp
        dz1 = dg1 * m_ * gpp
        dg2 += tl.dot(dm, tl.load(w2p), input_precision="ieee")
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
        dx2 += tl.dot(dz2, tl.trans(tl.load(w2p)), input_precision="ieee")
        dz1 += dx2 * gp
        tl.store(DK + step * BLK * D + rc, tl.dot(dz1, tl.trans(tl.load(w1p)), input_precision="ieee")
                 - slr[:, None] * ga1)
        tl.store(DQ + step * BLK * D + rc, tl.dot(dz1bar, tl.trans(tl.load(w1p)), input_precision="ieee"))
        tl.debug_barrier()  # ∂L/∂W of the step after read by every thread before it is updated
        tl.store(a2p, tl.load(a2p) + tl.dot(tl.trans(x2bar), do, input_precision="ieee")
                 + tl.dot(tl.trans(dm), g2, input_precision="ieee") + tl.dot(tl.trans(x2), dz2, input_precision="ieee"))
        a_b2 += tl.sum(do, 0) + tl.sum(dz2, 0)
        tl.store(a1p, tl.load(a1p) + tl.dot(tl.trans(k), dz1, input_precision="ieee")
                 + tl.dot(tl.trans(q), dz1bar, input_precision="ieee"))
        a_b1 += tl.sum(dz1, 0) + tl.sum(dz1bar, 0)
        tl.debug_barrier()  # the recovered weights and ∂L/∂W visible to every thread for the next step
    tl.store(DB1 + bh * HD + e, a_b1)
    tl.store(DB2 + bh * D + c, a_b2)
    tl.store(DLNW + bh * D + c, d_lnw)
    tl.store(DLNB + bh * D + c, d_lnb)
