"""The Triton kernels of ops/titans/triton.py (imported only when they are used): the Titans chunk scan,
forward and backward. See triton.py for the equations. Every size is padded to a power of two ≥ 16 (BLK, DK,
DH, DV) with masked loads (zeros), so any chunk length and head dim run; all math is fp32
(``input_precision="ieee"``)."""
try:  # transformers' import check of an exported folder skips try blocks; triton.py imports this module
    # only where triton is installed (its AVAILABLE), so loading a folder never needs triton
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("the Triton kernels need triton (ops/<family>/triton.py imports them only where it is installed)") from e
from ...common.triton_kernels import _ld1, _ld2, _mm, _st1, _st2, _tanh


_C0 = tl.constexpr(0.7978845608028654)  # √(2/π): the exact constant of F.gelu(approximate="tanh")
_C1 = tl.constexpr(0.7978845608028654 * 0.044715)


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
    """φ = τ tanh(n/τ)/n, n = max(‖X‖‖Δ‖, 1e-12) per row (common.backprop.soft_clamp_factor); with ‖Δ‖, n, tanh."""
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
