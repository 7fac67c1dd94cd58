"""The Triton kernels of models/triton_memory.py (imported only when they are used): the Titans
chunk scan and the LaCT apply-then-gradient step, forward and backward. See triton_memory.py for
the equations. Every size is padded to a power of two ≥ 16 (BLK, DK, DH, DV, BT, D, BJ) with masked
loads (zeros), so any chunk length and head dim run; all math is fp32 (``input_precision="ieee"``)."""
import triton
import triton.language as tl

_C0 = tl.constexpr(0.7978845608028654)  # √(2/π): the exact constant of F.gelu(approximate="tanh")
_C1 = tl.constexpr(0.7978845608028654 * 0.044715)


@triton.jit
def _ld2(ptr, R: tl.constexpr, C: tl.constexpr, nr, nc):
    """A row-major [nr, nc] matrix at ptr as an [R, C] fp32 tile, zero-padded."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * nc + c[None, :], mask=(r[:, None] < nr) & (c[None, :] < nc),
                   other=0.0).to(tl.float32)


@triton.jit
def _st2(ptr, x, R: tl.constexpr, C: tl.constexpr, nr, nc):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * nc + c[None, :], x.to(ptr.dtype.element_ty),
             mask=(r[:, None] < nr) & (c[None, :] < nc))


@triton.jit
def _ld1(ptr, R: tl.constexpr, nr):
    r = tl.arange(0, R)
    return tl.load(ptr + r, mask=r < nr, other=0.0).to(tl.float32)


@triton.jit
def _st1(ptr, x, R: tl.constexpr, nr):
    r = tl.arange(0, R)
    tl.store(ptr + r, x.to(ptr.dtype.element_ty), mask=r < nr)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


# ------------------------------------------------------------------------------------- Titans


@triton.jit
def _gelu3(x):
    """gelu(x), gelu'(x), gelu''(x) of the tanh GELU (exact √(2/π)) from one tanh."""
    x2 = x * x
    t = _tanh(x * (_C0 + _C1 * x2))
    du = _C0 + 3.0 * _C1 * x2
    sech2 = 1.0 - t * t
    d1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    d2 = sech2 * (du - x * t * du * du + 3.0 * _C1 * x2)
    return 0.5 * x * (1.0 + t), d1, d2


@triton.jit
def _rownorm(x):
    return tl.sqrt(tl.sum(x * x, 1))


@triton.jit
def _clamp_factor(xn, dr, tau):
    """φ = τ tanh(n/τ)/n, n = max(‖X‖‖Δ‖, 1e-12) per row (titans.soft_clamp_factor); with ‖Δ‖, n, tanh."""
    dn = _rownorm(dr)
    nc = tl.maximum(xn * dn, 1e-12)
    th = _tanh(nc / tau)
    return tau * th / nc, dn, nc, th


@triton.jit
def _clamp_bwd(dd, dr, x, xn, tau):
    """Δ = φ(‖X‖‖Δr‖) Δr backwards: (∂L/∂Δr, the extra ∂L/∂X) from dd = ∂L/∂Δ."""
    phi, dn, nc, th = _clamp_factor(xn, dr, tau)
    gam = tl.sum(dd * dr, 1)
    dphi = tl.where(xn * dn > 1e-12, (1.0 - th * th - phi) / nc, 0.0)  # clamp_min passes no gradient
    g = gam * dphi
    ddr = phi[:, None] * dd + (g * tl.where(dn > 0, xn / tl.where(dn > 0, dn, 1.0), 0.0))[:, None] * dr
    dx = (g * tl.where(xn > 0, dn / tl.where(xn > 0, xn, 1.0), 0.0))[:, None] * x  # ∇‖x‖ = 0 at 0, as torch
    return ddr, dx


@triton.jit
def _titans_fwd(W10, W20, S10, S20, Q, K, V, CM, SL, BE, FF, MM, OUT, W1S, W2S, S1S, S2S, W1N, W2N, S1N, S2N,
                N, BH, n, dk, dh, dv, tau,
                BLK: tl.constexpr, DK: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr,
                DEPTH: tl.constexpr, MOM: tl.constexpr, CLAMP: tl.constexpr):
    """One program per (batch, head) walks the N chunks; W1: [dk, dh] (depth 1: dh = dv), W2: [dh, dv]."""
    bh = tl.program_id(0)
    w1 = _ld2(W10 + bh * dk * dh, DK, DH, dk, dh)
    s1 = tl.zeros([DK, DH], dtype=tl.float32)
    w2 = tl.zeros([DH, DV], dtype=tl.float32)
    s2 = tl.zeros([DH, DV], dtype=tl.float32)
    if MOM:
        s1 = _ld2(S10 + bh * dk * dh, DK, DH, dk, dh)
    if DEPTH == 2:
        w2 = _ld2(W20 + bh * dh * dv, DH, DV, dh, dv)
        if MOM:
            s2 = _ld2(S20 + bh * dh * dv, DH, DV, dh, dv)
    for i in range(N):
        step = i * BH + bh
        _st2(W1S + step * dk * dh, w1, DK, DH, dk, dh)
        if MOM:
            _st2(S1S + step * dk * dh, s1, DK, DH, dk, dh)
        if DEPTH == 2:
            _st2(W2S + step * dh * dv, w2, DH, DV, dh, dv)
            if MOM:
                _st2(S2S + step * dh * dv, s2, DH, DV, dh, dv)
        q = _ld2(Q + step * n * dk, BLK, DK, n, dk)
        k = _ld2(K + step * n * dk, BLK, DK, n, dk)
        v = _ld2(V + step * n * dv, BLK, DV, n, dv)
        cm = _ld2(CM + step * n * n, BLK, BLK, n, n)
        cl = _ld1(CM + step * n * n + (n - 1) * n, BLK, n)  # c_{b−1, ·}
        be = _ld1(BE + step * n, BLK, n)
        be_l = tl.load(BE + step * n + n - 1).to(tl.float32)
        # the inner gradient at the chunk's start: layer inputs X_l, errors Δ_l (soft-clamped)
        z1 = _mm(k, w1)
        if DEPTH == 2:
            x2, gp, gpp = _gelu3(z1)
            e = _mm(x2, w2) - v
            d1 = _mm(e, tl.trans(w2)) * gp
            d2 = e
            if CLAMP:
                d2 = d2 * _clamp_factor(_rownorm(x2), e, tau)[0][:, None]
        else:
            d1 = z1 - v
        if CLAMP:
            d1 = d1 * _clamp_factor(_rownorm(k), d1, tau)[0][:, None]
        # the read: Z̄_l = β ⊙ H W_l + (C ⊙ H X_lᵀ) Δ_l + f ⊙ H S_l
        zb = be[:, None] * _mm(q, w1) + _mm(cm * _mm(q, tl.trans(k)), d1)
        if MOM:
            ff = _ld1(FF + step * n, BLK, n)
            zb += ff[:, None] * _mm(q, s1)
        if DEPTH == 2:
            hq = _gelu3(zb)[0]
            zb = be[:, None] * _mm(hq, w2) + _mm(cm * _mm(hq, tl.trans(x2)), d2)
            if MOM:
                zb += ff[:, None] * _mm(hq, s2)
        _st2(OUT + step * n * dv, zb, BLK, DV, n, dv)
        # the update: W_l ← β_b W_l + (c_b ⊙ X_l)ᵀ Δ_l + f_b S_l,  S_l ← m_b S_l + (s_b ⊙ X_l)ᵀ Δ_l
        nw1 = be_l * w1 + _mm(tl.trans(k * cl[:, None]), d1)
        if DEPTH == 2:
            nw2 = be_l * w2 + _mm(tl.trans(x2 * cl[:, None]), d2)
        if MOM:
            sl = _ld1(SL + step * n, BLK, n)
            f_l = tl.load(FF + step * n + n - 1).to(tl.float32)
            m_l = tl.load(MM + step * n + n - 1).to(tl.float32)
            nw1 += f_l * s1
            s1 = m_l * s1 + _mm(tl.trans(k * sl[:, None]), d1)
            if DEPTH == 2:
                nw2 += f_l * s2
                s2 = m_l * s2 + _mm(tl.trans(x2 * sl[:, None]), d2)
        w1 = nw1
        if DEPTH == 2:
            w2 = nw2
    _st2(W1N + bh * dk * dh, w1, DK, DH, dk, dh)
    if MOM:
        _st2(S1N + bh * dk * dh, s1, DK, DH, dk, dh)
    if DEPTH == 2:
        _st2(W2N + bh * dh * dv, w2, DH, DV, dh, dv)
        if MOM:
            _st2(S2N + bh * dh * dv, s2, DH, DV, dh, dv)


@triton.jit
def _titans_bwd(W1S, W2S, S1S, S2S, Q, K, V, CM, SL, BE, FF, MM, DOUT, DW1N, DW2N, DS1N, DS2N,
                DW10, DW20, DS10, DS20, DQ, DK_, DV_, DCM, DSL, DBE, DFF, DMM,
                N, BH, n, dk, dh, dv, tau,
                BLK: tl.constexpr, DK: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr,
                DEPTH: tl.constexpr, MOM: tl.constexpr, CLAMP: tl.constexpr):
    """The chunks in reverse: recompute each from its stored weights, carry ∂L/∂W_l, ∂L/∂S_l."""
    bh = tl.program_id(0)
    r = tl.arange(0, BLK)
    last = r == n - 1
    aw1 = _ld2(DW1N + bh * dk * dh, DK, DH, dk, dh)  # ∂L/∂(state after the current chunk)
    as1 = tl.zeros([DK, DH], dtype=tl.float32)
    aw2 = tl.zeros([DH, DV], dtype=tl.float32)
    as2 = tl.zeros([DH, DV], dtype=tl.float32)
    s1 = tl.zeros([DK, DH], dtype=tl.float32)
    s2 = tl.zeros([DH, DV], dtype=tl.float32)
    if MOM:
        as1 = _ld2(DS1N + bh * dk * dh, DK, DH, dk, dh)
    if DEPTH == 2:
        aw2 = _ld2(DW2N + bh * dh * dv, DH, DV, dh, dv)
        if MOM:
            as2 = _ld2(DS2N + bh * dh * dv, DH, DV, dh, dv)
    for j in range(N):
        step = (N - 1 - j) * BH + bh
        w1 = _ld2(W1S + step * dk * dh, DK, DH, dk, dh)
        if MOM:
            s1 = _ld2(S1S + step * dk * dh, DK, DH, dk, dh)
        if DEPTH == 2:
            w2 = _ld2(W2S + step * dh * dv, DH, DV, dh, dv)
            if MOM:
                s2 = _ld2(S2S + step * dh * dv, DH, DV, dh, dv)
        q = _ld2(Q + step * n * dk, BLK, DK, n, dk)
        k = _ld2(K + step * n * dk, BLK, DK, n, dk)
        v = _ld2(V + step * n * dv, BLK, DV, n, dv)
        do = _ld2(DOUT + step * n * dv, BLK, DV, n, dv)
        cm = _ld2(CM + step * n * n, BLK, BLK, n, n)
        cl = _ld1(CM + step * n * n + (n - 1) * n, BLK, n)
        be = _ld1(BE + step * n, BLK, n)
        be_l = tl.load(BE + step * n + n - 1).to(tl.float32)
        if MOM:
            sl = _ld1(SL + step * n, BLK, n)
            ff = _ld1(FF + step * n, BLK, n)
            f_l = tl.load(FF + step * n + n - 1).to(tl.float32)
            m_l = tl.load(MM + step * n + n - 1).to(tl.float32)
        # ---- recompute the chunk's forward
        kn = _rownorm(k)
        z1 = _mm(k, w1)
        if DEPTH == 2:
            x2, gp, gpp = _gelu3(z1)
            e = _mm(x2, w2) - v
            lin = _mm(e, tl.trans(w2))
            d1r = lin * gp
            d2 = e
            if CLAMP:
                x2n = _rownorm(x2)
                d2 = e * _clamp_factor(x2n, e, tau)[0][:, None]
        else:
            d1r = z1 - v
        d1 = d1r
        if CLAMP:
            d1 = d1r * _clamp_factor(kn, d1r, tau)[0][:, None]
        a1 = _mm(q, tl.trans(k))
        p1 = cm * a1
        zb1 = be[:, None] * _mm(q, w1) + _mm(p1, d1)
        if MOM:
            zb1 += ff[:, None] * _mm(q, s1)
        # ---- the update, backwards (aw, as: ∂L/∂W_l, ∂L/∂S_l after the chunk)
        xa1 = _mm(k, aw1)
        dcl = tl.sum(xa1 * d1, 1)
        gk = cl[:, None] * _mm(d1, tl.trans(aw1))
        dd1 = cl[:, None] * xa1
        dbe_l = tl.sum(tl.sum(aw1 * w1, 1), 0)
        nw1 = be_l * aw1
        if MOM:
            xs1 = _mm(k, as1)
            dsl = tl.sum(xs1 * d1, 1)
            gk += sl[:, None] * _mm(d1, tl.trans(as1))
            dd1 += sl[:, None] * xs1
            df_l = tl.sum(tl.sum(aw1 * s1, 1), 0)
            dm_l = tl.sum(tl.sum(as1 * s1, 1), 0)
            ns1 = f_l * aw1 + m_l * as1
        if DEPTH == 2:
            xa2 = _mm(x2, aw2)
            dcl += tl.sum(xa2 * d2, 1)
            dx2 = cl[:, None] * _mm(d2, tl.trans(aw2))
            dd2 = cl[:, None] * xa2
            dbe_l += tl.sum(tl.sum(aw2 * w2, 1), 0)
            nw2 = be_l * aw2
            if MOM:
                xs2 = _mm(x2, as2)
                dsl += tl.sum(xs2 * d2, 1)
                dx2 += sl[:, None] * _mm(d2, tl.trans(as2))
                dd2 += sl[:, None] * xs2
                df_l += tl.sum(tl.sum(aw2 * s2, 1), 0)
                dm_l += tl.sum(tl.sum(as2 * s2, 1), 0)
                ns2 = f_l * aw2 + m_l * as2
        # ---- the read, backwards
        g1 = do
        dcm = tl.zeros([BLK, BLK], dtype=tl.float32)
        dbe = tl.zeros([BLK], dtype=tl.float32)
        dff = tl.zeros([BLK], dtype=tl.float32)
        if DEPTH == 2:
            hq, gq, gqq = _gelu3(zb1)
            a2 = _mm(hq, tl.trans(x2))
            bg = be[:, None] * do
            nw2 += _mm(tl.trans(hq), bg)
            dbe += tl.sum(do * _mm(hq, w2), 1)
            dp = _mm(do, tl.trans(d2))
            dd2 += _mm(tl.trans(cm * a2), do)
            dcm += dp * a2
            da = dp * cm
            dhq = _mm(da, x2) + _mm(bg, tl.trans(w2))
            dx2 += _mm(tl.trans(da), hq)
            if MOM:
                fg = ff[:, None] * do
                ns2 += _mm(tl.trans(hq), fg)
                dff += tl.sum(do * _mm(hq, s2), 1)
                dhq += _mm(fg, tl.trans(s2))
            g1 = dhq * gq
        bg1 = be[:, None] * g1
        nw1 += _mm(tl.trans(q), bg1)
        dbe += tl.sum(g1 * _mm(q, w1), 1)
        dp1 = _mm(g1, tl.trans(d1))
        dd1 += _mm(tl.trans(p1), g1)
        dcm += dp1 * a1
        da1 = dp1 * cm
        dq = _mm(da1, k) + _mm(bg1, tl.trans(w1))
        gk += _mm(tl.trans(da1), q)
        if MOM:
            fg1 = ff[:, None] * g1
            ns1 += _mm(tl.trans(q), fg1)
            dff += tl.sum(g1 * _mm(q, s1), 1)
            dq += _mm(fg1, tl.trans(s1))
        # the last row's update coefficients c_b, β_b, f_b, m_b
        dcm += tl.where(last[:, None], dcl[None, :], 0.0)
        dbe += tl.where(last, dbe_l, 0.0)
        _st2(DQ + step * n * dk, dq, BLK, DK, n, dk)
        _st2(DCM + step * n * n, dcm, BLK, BLK, n, n)
        _st1(DBE + step * n, dbe, BLK, n)
        if MOM:
            _st1(DSL + step * n, dsl, BLK, n)
            _st1(DFF + step * n, dff + tl.where(last, df_l, 0.0), BLK, n)
            _st1(DMM + step * n, tl.where(last, dm_l, 0.0), BLK, n)
        # ---- the soft clamp and the inner gradient, backwards
        dd1r = dd1
        if CLAMP:
            dd1r, dkc = _clamp_bwd(dd1, d1r, k, kn, tau)
            gk += dkc
        if DEPTH == 2:
            dd2r = dd2
            if CLAMP:
                dd2r, dxc = _clamp_bwd(dd2, e, x2, x2n, tau)
                dx2 += dxc
            # Δ1r = (E W2ᵀ) ⊙ gelu'(Z1),  E = gelu(Z1) W2 − v,  Z1 = K W1
            dlin = dd1r * gp
            de = dd2r + _mm(dlin, w2)
            nw2 += _mm(tl.trans(dlin), e) + _mm(tl.trans(x2), de)
            dz1 = dd1r * lin * gpp + (dx2 + _mm(de, tl.trans(w2))) * gp
        else:
            dz1 = dd1r  # Δ1r = K W1 − v
            de = dd1r
        _st2(DV_ + step * n * dv, -de, BLK, DV, n, dv)
        nw1 += _mm(tl.trans(k), dz1)
        gk += _mm(dz1, tl.trans(w1))
        _st2(DK_ + step * n * dk, gk, BLK, DK, n, dk)
        aw1 = nw1
        if MOM:
            as1 = ns1
        if DEPTH == 2:
            aw2 = nw2
            if MOM:
                as2 = ns2
    _st2(DW10 + bh * dk * dh, aw1, DK, DH, dk, dh)
    if MOM:
        _st2(DS10 + bh * dk * dh, as1, DK, DH, dk, dh)
    if DEPTH == 2:
        _st2(DW20 + bh * dh * dv, aw2, DH, DV, dh, dv)
        if MOM:
            _st2(DS20 + bh * dh * dv, as2, DH, DV, dh, dv)


# --------------------------------------------------------------------------------------- LaCT


@triton.jit
def _ldi(ptr, ri, ci, nr, nc, stride):
    """rows ri × columns ci of a row-major matrix ([nr, nc] valid, row stride ``stride``), fp32, zero-padded."""
    return tl.load(ptr + ri[:, None] * stride + ci[None, :], mask=(ri[:, None] < nr) & (ci[None, :] < nc),
                   other=0.0).to(tl.float32)


@triton.jit
def _sti(ptr, x, ri, ci, nr, nc, stride):
    tl.store(ptr + ri[:, None] * stride + ci[None, :], x.to(ptr.dtype.element_ty),
             mask=(ri[:, None] < nr) & (ci[None, :] < nc))


@triton.jit
def _lact_block(W0, W1, W2, bh, jj, c, d, dh):
    """The d_h block jj of W0, W2 ([D, BJ]) and W1 ([BJ, D]) of program bh."""
    w0 = _ldi(W0 + bh * d * dh, c, jj, d, dh, dh)
    w2 = _ldi(W2 + bh * d * dh, c, jj, d, dh, dh)
    w1 = _ldi(W1 + bh * dh * d, jj, c, dh, d, d)
    return w0, w1, w2


@triton.jit
def _silu_parts(a):
    """σ(a), SiLU(a), SiLU'(a) = σ(1 + a(1 − σ))."""
    sg = tl.sigmoid(a)
    return sg, a * sg, sg * (1.0 + a * (1.0 - sg))


@triton.jit
def _lact_apply(W0, W1, W2, Q, OUT, n, d, dh, BT: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """o = (SiLU(q W0) ⊙ q W2) W1 for one token block (program (bh, token block)), looping over d_h."""
    bh = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.arange(0, D)
    q = _ldi(Q + bh * n * d, t, c, n, d, d)
    o = tl.zeros([BT, D], dtype=tl.float32)
    for j0 in range(0, dh, BJ):
        w0, w1, w2 = _lact_block(W0, W1, W2, bh, j0 + tl.arange(0, BJ), c, d, dh)
        a = _mm(q, w0)
        o += _mm(a * tl.sigmoid(a) * _mm(q, w2), w1)
    _sti(OUT + bh * n * d, o, t, c, n, d, d)


@triton.jit
def _lact_grads(W0, W1, W2, K, V, L0, L1, L2, G0, G1, G2, n, d, dh,
                BT: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """G0, G1, G2 for one d_h block (program (bh, d_h block)), looping over the tokens."""
    bh = tl.program_id(0)
    jj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    c = tl.arange(0, D)
    w0, w1, w2 = _lact_block(W0, W1, W2, bh, jj, c, d, dh)
    g0 = tl.zeros([D, BJ], dtype=tl.float32)
    g2 = tl.zeros([D, BJ], dtype=tl.float32)
    g1 = tl.zeros([BJ, D], dtype=tl.float32)
    for t0 in range(0, n, BT):
        t = t0 + tl.arange(0, BT)
        k = _ldi(K + bh * n * d, t, c, n, d, d)
        v = _ldi(V + bh * n * d, t, c, n, d, d)
        l0 = tl.load(L0 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        l1 = tl.load(L1 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        l2 = tl.load(L2 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        a = _mm(k, w0)
        z = _mm(k, w2)
        e = _mm(v, tl.trans(w1))
        sg, sa, ds = _silu_parts(a)
        g0 -= _mm(tl.trans(k * l0[:, None]), e * z * ds)
        g2 -= _mm(tl.trans(k * l2[:, None]), e * sa)
        g1 -= _mm(tl.trans(sa * z * l1[:, None]), v)
    _sti(G0 + bh * d * dh, g0, c, jj, d, dh, dh)
    _sti(G2 + bh * d * dh, g2, c, jj, d, dh, dh)
    _sti(G1 + bh * dh * d, g1, jj, c, dh, d, d)


@triton.jit
def _lact_bwd_tokens(q, do, k, v, l0, l1, l2, w0, w1, w2, dg0, dg1, dg2):
    """The per-token backward of one token block × d_h block: ∂L/∂(q W0, q W2) of the apply and
    ∂L/∂(e, z, a) of the gradient sums (dg*: ∂L/∂G*), with what the token gradients need."""
    aq = _mm(q, w0)
    zq = _mm(q, w2)
    sq, saq, dsq = _silu_parts(aq)
    dhq = _mm(do, tl.trans(w1))
    daq = dhq * zq * dsq
    dzq = dhq * saq
    a = _mm(k, w0)
    z = _mm(k, w2)
    e = _mm(v, tl.trans(w1))
    sg, sa, ds = _silu_parts(a)
    dp0 = -l0[:, None] * _mm(k, dg0)
    dp2 = -l2[:, None] * _mm(k, dg2)
    vg1 = _mm(v, tl.trans(dg1))
    dh = -l1[:, None] * vg1
    dds = sg * (1.0 - sg) * (2.0 + a * (1.0 - 2.0 * sg))  # SiLU''
    de = dp0 * z * ds + dp2 * sa
    dz = dp0 * e * ds + dh * sa
    da = dp0 * e * z * dds + dp2 * e * ds + dh * z * ds
    return saq * zq, daq, dzq, de, dz, da, e * z * ds, e * sa, sa * z, vg1


@triton.jit
def _lact_bwd_w(W0, W1, W2, Q, K, V, L0, L1, L2, DO, DG0, DG1, DG2, DW0, DW1, DW2, n, d, dh,
                BT: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """∂L/∂W0, W1, W2 for one d_h block, looping over the tokens."""
    bh = tl.program_id(0)
    jj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    c = tl.arange(0, D)
    w0, w1, w2 = _lact_block(W0, W1, W2, bh, jj, c, d, dh)
    dg0, dg1, dg2 = _lact_block(DG0, DG1, DG2, bh, jj, c, d, dh)
    dw0 = tl.zeros([D, BJ], dtype=tl.float32)
    dw2 = tl.zeros([D, BJ], dtype=tl.float32)
    dw1 = tl.zeros([BJ, D], dtype=tl.float32)
    for t0 in range(0, n, BT):
        t = t0 + tl.arange(0, BT)
        q = _ldi(Q + bh * n * d, t, c, n, d, d)
        do = _ldi(DO + bh * n * d, t, c, n, d, d)
        k = _ldi(K + bh * n * d, t, c, n, d, d)
        v = _ldi(V + bh * n * d, t, c, n, d, d)
        l0 = tl.load(L0 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        l1 = tl.load(L1 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        l2 = tl.load(L2 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
        hq, daq, dzq, de, dz, da, p0, p2, h, vg1 = _lact_bwd_tokens(q, do, k, v, l0, l1, l2, w0, w1, w2,
                                                                    dg0, dg1, dg2)
        dw1 += _mm(tl.trans(hq), do) + _mm(tl.trans(de), v)
        dw0 += _mm(tl.trans(q), daq) + _mm(tl.trans(k), da)
        dw2 += _mm(tl.trans(q), dzq) + _mm(tl.trans(k), dz)
    _sti(DW0 + bh * d * dh, dw0, c, jj, d, dh, dh)
    _sti(DW2 + bh * d * dh, dw2, c, jj, d, dh, dh)
    _sti(DW1 + bh * dh * d, dw1, jj, c, dh, d, d)


@triton.jit
def _lact_bwd_x(W0, W1, W2, Q, K, V, L0, L1, L2, DO, DG0, DG1, DG2, DQ, DK, DV, DL0, DL1, DL2, n, d, dh,
                BT: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """∂L/∂q, k, v, η0, η1, η2 for one token block, looping over d_h."""
    bh = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.arange(0, D)
    q = _ldi(Q + bh * n * d, t, c, n, d, d)
    do = _ldi(DO + bh * n * d, t, c, n, d, d)
    k = _ldi(K + bh * n * d, t, c, n, d, d)
    v = _ldi(V + bh * n * d, t, c, n, d, d)
    l0 = tl.load(L0 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
    l1 = tl.load(L1 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
    l2 = tl.load(L2 + bh * n + t, mask=t < n, other=0.0).to(tl.float32)
    dq = tl.zeros([BT, D], dtype=tl.float32)
    dk = tl.zeros([BT, D], dtype=tl.float32)
    dv = tl.zeros([BT, D], dtype=tl.float32)
    t0 = tl.zeros([BT, D], dtype=tl.float32)  # Σ_j (e ⊙ z ⊙ s'(a)) ∂L/∂G0ᵀ
    t2 = tl.zeros([BT, D], dtype=tl.float32)  # Σ_j (e ⊙ SiLU(a)) ∂L/∂G2ᵀ
    dl1 = tl.zeros([BT], dtype=tl.float32)
    for j0 in range(0, dh, BJ):
        jj = j0 + tl.arange(0, BJ)
        w0, w1, w2 = _lact_block(W0, W1, W2, bh, jj, c, d, dh)
        dg0, dg1, dg2 = _lact_block(DG0, DG1, DG2, bh, jj, c, d, dh)
        hq, daq, dzq, de, dz, da, p0, p2, h, vg1 = _lact_bwd_tokens(q, do, k, v, l0, l1, l2, w0, w1, w2,
                                                                    dg0, dg1, dg2)
        dq += _mm(daq, tl.trans(w0)) + _mm(dzq, tl.trans(w2))
        dk += _mm(da, tl.trans(w0)) + _mm(dz, tl.trans(w2))
        dv += _mm(de, w1) - l1[:, None] * _mm(h, dg1)
        t0 += _mm(p0, tl.trans(dg0))
        t2 += _mm(p2, tl.trans(dg2))
        dl1 -= tl.sum(h * vg1, 1)
    dk -= l0[:, None] * t0 + l2[:, None] * t2
    _sti(DQ + bh * n * d, dq, t, c, n, d, d)
    _sti(DK + bh * n * d, dk, t, c, n, d, d)
    _sti(DV + bh * n * d, dv, t, c, n, d, d)
    tl.store(DL0 + bh * n + t, -tl.sum(k * t0, 1), mask=t < n)
    tl.store(DL1 + bh * n + t, dl1, mask=t < n)
    tl.store(DL2 + bh * n + t, -tl.sum(k * t2, 1), mask=t < n)
