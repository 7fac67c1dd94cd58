"""The Triton kernels of ops/lact/triton.py (imported only when they are used): the LaCT apply-then-gradient
step, forward and backward. See triton.py for the equations. Every size is padded to a power of two ≥ 16 (BT,
D, BJ) with masked loads (zeros); all math is fp32 (``input_precision="ieee"``)."""
try:  # transformers' import check of an exported folder skips try blocks; triton.py imports this module
    # only where triton is installed (its AVAILABLE), so loading a folder never needs triton
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("the Triton kernels need triton (ops/<family>/triton.py imports them only where it is installed)") from e
from ...common.triton_kernels import _mm


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
