"""The sequential core of the chunked Titans scan (``ops.titans.chunk.titans_scan_chunked``) as an autograd
Function with a hand-written backward.

Across whole chunks only the memory (W_l, S_l per layer l) is sequential. With chunk i's coefficients
(β, f per token as row factors, C, the last row c = C_{b−1,·} and s = s_last as column factors,
β̄, f̄, m̄ their values at the chunk's last token), one chunk is

    X_0 = K, Z_l = X_l W_l, X_{l+1} = gelu(Z_l), δ_{L−1} = Z_{L−1} − V, δ_{l−1} = (δ_l W_lᵀ) ⊙ gelu'(Z_{l−1})
    Δ_l = φ(‖X_l‖‖δ_l‖) ⊙ δ_l            (per token; φ(n) = τ tanh(n/τ)/n, 1 without max_grad_norm)
    H_0 = Q, Ẑ_l = diag(β) H_l W_l + diag(f) H_l S_l + (C ⊙ H_l X_lᵀ) Δ_l, H_{l+1} = gelu(Ẑ_l), O = Ẑ_{L−1}
    W_l ← β̄ W_l + f̄ S_l + X_lᵀ diag(c) Δ_l,   S_l ← m̄ S_l + X_lᵀ diag(s) Δ_l

(C ⊙ Q Kᵀ, layer 0's memory-free mix, comes in precomputed for all chunks; plain GD has no S, f).
The backward runs the chunks in reverse carrying the adjoints ∂L/∂W_l, ∂L/∂S_l and, per chunk,
differentiates these lines in reverse order (update, read, clamp, then the error recursion and the
forward through the memory, with gelu'' where δ depends on Z through gelu'). GELU and its first two
derivatives come from one tanh in the forward. The per-token quantities and each chunk's starting
memory are kept (N · d_in · d_out per layer, never T · d_in · d_out), so no autograd graph is built per
chunk. ``ops.titans.chunk._segment`` (autograd) is the reference it is tested against.
Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..ttt.fused import _autocast_off


_C = (2.0 / 3.141592653589793) ** 0.5  # √(2/π), exact (as F.gelu's tanh form)
_A = 0.044715


def gelu_parts(x: torch.Tensor, order: int = 1):
    """The tanh GELU and its first ``order`` ≤ 2 derivatives from one p = ½(1 + tanh u) = σ(2u),
    u = c(x + a x³) (c = √(2/π), a = 0.044715, u' = c(1 + 3a x²), q = p(1 − p), t = 2p − 1):

        gelu = x p,   gelu' = p + 2 x u' q,   gelu'' = 4q (u' + ½x(u'' − 2t u'²)) = 4q (2u' − c − t x u'²).
    """
    x2 = x * x
    p = torch.sigmoid(x2.mul(2 * _A * _C).add_(2 * _C).mul_(x))
    if order == 0:
        return (x * p,)
    q = torch.addcmul(p, p, p, value=-1.0)
    du = x2.mul_(3 * _A * _C).add_(_C)
    xdu = x * du
    g1 = torch.addcmul(p, xdu, q, value=2.0)
    if order == 1:
        return x * p, g1
    g2 = p.mul(2).sub_(1).mul_(xdu).neg_().add_(2).mul_(du).sub_(_C).mul_(q).mul_(4)
    return x * p, g1, g2


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_o a_to b_to per row: [.., n, d] → [.., n, 1]."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def _matdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a ⊙ b per matrix: [BH, m, n] → [BH, 1, 1]."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))[:, None, None]


def _errors(W: list, k: torch.Tensor, v: torch.Tensor, grad: bool = True):
    """Forward of the memory at W on the keys and the backpropagated errors of ½‖M(k) − v‖²:
    X_l, δ_l, gelu'(Z_l) and e_{l+1} ⊙ gelu''(Z_l) (l < L − 1; e_l = δ_l W_lᵀ; the last only with ``grad``)."""
    L = len(W)
    xs, g1s, g2s, x = [], [], [], k
    for i, w in enumerate(W):
        xs.append(x)
        z = torch.bmm(x, w)
        if i < L - 1:
            x, g1, *g2 = gelu_parts(z, 2 if grad else 1)
            g1s.append(g1)
            g2s += g2
    ds, eg2 = [None] * L, [None] * (L - 1)
    ds[-1] = z - v
    for i in range(L - 1, 0, -1):
        e = torch.bmm(ds[i], W[i].transpose(-1, -2))
        ds[i - 1] = e * g1s[i - 1]
        if grad:
            eg2[i - 1] = e.mul_(g2s[i - 1])
    return xs, ds, g1s, eg2


def _soft_clamp(x_sq: torch.Tensor, d: torch.Tensor, tau: float):
    """Δ = φ(r) δ with r = ‖x‖‖δ‖ (clamped at 1e-12), and what its backward needs: (φ, φ'(r)/r, ‖δ‖²)."""
    d_sq = _rowdot(d, d)
    raw = (x_sq * d_sq).sqrt()
    r = raw.clamp_min(1e-12)
    th = torch.tanh(r / tau)
    phi = tau * th / r
    dphi_r = torch.where(raw > 1e-12, (1 - th * th - phi) / (r * r), torch.zeros_like(r))  # φ'(r)/r
    return d * phi, (phi, dphi_r, d_sq)


def _soft_clamp_backward(g: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor, d: torch.Tensor, saved):
    """(∂L/∂δ, ∂L/∂x from the clamp) given g = ∂L/∂Δ."""
    phi, dphi_r, d_sq = saved
    kappa = _rowdot(g, d) * dphi_r
    return torch.addcmul(g * phi, kappa * x_sq, d), (kappa * d_sq) * x


def _read(W: list, S: list | None, xs: list, Ds: list, q, qk_mix, c, beta, f, grad: bool = True):
    """Ẑ_l = diag(β) H_l W_l + diag(f) H_l S_l + (C ⊙ H_l X_lᵀ) Δ_l, H_{l+1} = gelu(Ẑ_l).
    Returns (O, H_l, gelu'(Ẑ_l), H_l X_lᵀ) (the last three for l ≥ 1, l < L − 1, l ≥ 1; gelu' with ``grad``)."""
    hs, g1s, mixes, h = [], [], [], q
    L = len(W)
    for i in range(L):
        if i == 0:
            P = qk_mix
        else:
            hs.append(h)
            A = torch.bmm(h, xs[i].transpose(-1, -2))
            mixes.append(A)
            P = c * A
        z = torch.bmm(h, W[i]).mul_(beta)
        if S is not None:
            z.addcmul_(torch.bmm(h, S[i]), f)
        z.baddbmm_(P, Ds[i])
        if i < L - 1:
            h, *g1 = gelu_parts(z, 1 if grad else 0)
            g1s += g1
    return z, hs, g1s, mixes


def _update(W: list, S: list | None, xs: list, Ds: list, c_last, s_last, beta_last, f_last, m_last):
    """W_l ← β̄ W_l + f̄ S_l + X_lᵀ diag(c) Δ_l,  S_l ← m̄ S_l + X_lᵀ diag(s) Δ_l."""
    new_w, new_s = [], None if S is None else []
    for i, (x, D) in enumerate(zip(xs, Ds)):
        xt = x.transpose(-1, -2)
        keep = W[i] * beta_last
        if S is not None:
            keep.addcmul_(S[i], f_last)
            new_s.append(torch.baddbmm(S[i] * m_last, xt, D * s_last))
        new_w.append(keep.baddbmm_(xt, D * c_last))
    return new_w, new_s


def _update_backward(adj_w, adj_s, W, S, xs, Ds, c_last, s_last, beta_last, f_last, m_last):
    """Backward of :func:`_update` given the adjoints of the new W, S: returns (∂W, ∂S, ∂Δ, ∂X, ∂c, ∂s,
    ∂β̄, ∂f̄, ∂m̄) (∂S and the momentum terms None for plain GD)."""
    g_w = [a * beta_last for a in adj_w]
    d_bl = sum(_matdot(a, w) for a, w in zip(adj_w, W))
    g_s = d_fl = d_ml = d_sl = None
    if S is not None:
        g_s = [torch.addcmul(a_s * m_last, a_w, f_last) for a_w, a_s in zip(adj_w, adj_s)]
        d_fl = sum(_matdot(a, s) for a, s in zip(adj_w, S))
        d_ml = sum(_matdot(a, s) for a, s in zip(adj_s, S))
    g_D, g_x, d_cl = [], [], 0
    for l, (x, D) in enumerate(zip(xs, Ds)):
        g_cD = torch.bmm(x, adj_w[l])
        g_x.append(torch.bmm(D * c_last, adj_w[l].transpose(-1, -2)))
        g_D.append(g_cD * c_last)
        d_cl = d_cl + _rowdot(g_cD, D)
        if S is not None:
            g_sD = torch.bmm(x, adj_s[l])
            g_x[l].baddbmm_(D * s_last, adj_s[l].transpose(-1, -2))
            g_D[l].addcmul_(g_sD, s_last)
            d_sl = (0 if d_sl is None else d_sl) + _rowdot(g_sD, D)
    return g_w, g_s, g_D, g_x, d_cl, d_sl, d_bl, d_fl, d_ml


def _read_backward(g_z, W, S, xs, Ds, hs, rg1s, mixes, qk_mix, c, beta, f, g_w, g_s, g_D, g_x):
    """Backward of :func:`_read` given ∂L/∂O; adds into g_w, g_s, g_D, g_x (per layer) and returns
    (∂Q, ∂(C ⊙ QKᵀ), ∂C, ∂β, ∂f)."""
    d_b, d_f, d_c = 0, 0, 0
    for l in range(len(W) - 1, -1, -1):
        h = hs[l]
        g_hw = torch.bmm(g_z, W[l].transpose(-1, -2))
        d_b = d_b + _rowdot(g_hw, h)
        g_h = g_hw.mul_(beta)
        g_w[l].baddbmm_(h.transpose(-1, -2), g_z * beta)
        if S is not None:
            g_hs = torch.bmm(g_z, S[l].transpose(-1, -2))
            d_f = d_f + _rowdot(g_hs, h)
            g_h.addcmul_(g_hs, f)
            g_s[l].baddbmm_(h.transpose(-1, -2), g_z * f)
        g_P = torch.bmm(g_z, Ds[l].transpose(-1, -2))
        if l == 0:
            g_D[0].baddbmm_(qk_mix.transpose(-1, -2), g_z)
            return g_h, g_P, d_c, d_b, (d_f if S is not None else None)
        A = mixes[l]
        g_D[l].baddbmm_((c * A).transpose(-1, -2), g_z)
        d_c = d_c + g_P * A
        g_A = g_P.mul_(c)
        g_h.baddbmm_(g_A, xs[l])
        g_x[l].baddbmm_(g_A.transpose(-1, -2), h)
        g_z = g_h.mul_(rg1s[l - 1])


def _errors_backward(g_d, g_x, W, xs, ds, g1s, eg2, g_w):
    """Backward of :func:`_errors` given ∂L/∂δ_l and ∂L/∂X_l; adds into g_w and returns (∂K, ∂V)."""
    L = len(W)
    g_zs = [None] * (L - 1)
    for l in range(L - 1):  # δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ gelu'(Z_l)
        g_e = g_d[l] * g1s[l]
        g_zs[l] = g_d[l] * eg2[l]
        g_d[l + 1] = torch.baddbmm(g_d[l + 1], g_e, W[l + 1])
        g_w[l + 1].baddbmm_(g_e.transpose(-1, -2), ds[l + 1])
    g = g_d[-1]  # δ_{L−1} = Z_{L−1} − V
    g_v = -g
    for l in range(L - 1, -1, -1):  # Z_l = X_l W_l, X_{l+1} = gelu(Z_l), X_0 = K
        g_w[l].baddbmm_(xs[l].transpose(-1, -2), g)
        g_in = g_x[l].baddbmm_(g, W[l].transpose(-1, -2))
        if l:
            g = g_zs[l - 1].addcmul_(g_in, g1s[l - 1])
    return g_in, g_v


class TitansChunkScan(torch.autograd.Function):
    """N whole chunks of the Titans memory (see the module docstring).

    q, k: [N, BH, b, d_0]; v: [N, BH, b, d_L]; qk_mix = C ⊙ QKᵀ, c = C: [N, BH, b, b]; beta, f, c_last,
    s_last: [N, BH, b, 1]; beta_last, f_last, m_last: [N, BH, 1, 1] (f, s_last, f_last, m_last None for
    plain GD); states: W_1..W_L, then S_1..S_L with momentum ([BH, d_l, d_{l+1}]); tau: max_grad_norm or
    None; grad: keep what the backward needs. Returns (O [N, BH, b, d_L], W_1..W_L, S_1..S_L after the
    chunks).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, tau, grad, q, k, v, qk_mix, c, beta, f, c_last, s_last, beta_last, f_last, m_last, *states):
        N, momentum = q.shape[0], f is not None
        L = len(states) // (2 if momentum else 1)
        W, S = list(states[:L]), (list(states[L:]) if momentum else None)
        out = q.new_empty(*q.shape[:3], W[-1].shape[-1])
        k_sq = _rowdot(k, k) if tau else None
        flat = []
        for i in range(N):
            xs, ds, g1s, eg2 = _errors(W, k[i], v[i], grad)
            Ds, record = ds, []
            if tau:
                x_sq = [k_sq[i]] + [_rowdot(x, x) for x in xs[1:]]
                Ds, clamps = zip(*(_soft_clamp(x2, d, tau) for x2, d in zip(x_sq, ds)))
                record = [*Ds, *x_sq[1:], *(t for cl in clamps for t in cl)]
            z, hs, rg1s, mixes = _read(W, S, xs, Ds, q[i], qk_mix[i], c[i], beta[i], None if f is None else f[i], grad)
            out[i] = z
            if grad:
                flat += [*W, *(S or []), *xs[1:], *ds, *g1s, *eg2, *hs, *rg1s, *mixes, *record]
            W, S = _update(W, S, xs, Ds, c_last[i], None if S is None else s_last[i], beta_last[i],
                           None if S is None else f_last[i], None if S is None else m_last[i])
        ctx.save_for_backward(q, k, v, qk_mix, c, beta, f, c_last, s_last, beta_last, f_last, m_last, *flat)
        ctx.tau, ctx.L, ctx.momentum = tau, L, momentum
        return (out, *W, *(S or []))

    @staticmethod
    @once_differentiable
    @_autocast_off
    def backward(ctx, d_out, *d_states):
        q, k, v, qk_mix, c, beta, f, c_last, s_last, beta_last, f_last, m_last, *flat = ctx.saved_tensors
        tau, L, momentum = ctx.tau, ctx.L, ctx.momentum
        N = q.shape[0]
        per = len(flat) // N
        d_out = q.new_zeros(*q.shape[:3], v.shape[-1]) if d_out is None else d_out
        grads = {n: torch.empty_like(t) for n, t in
                 dict(q=q, k=k, v=v, qk_mix=qk_mix, c=c, beta=beta, c_last=c_last, beta_last=beta_last).items()}
        if momentum:
            grads.update({n: torch.empty_like(t)
                          for n, t in dict(f=f, s_last=s_last, f_last=f_last, m_last=m_last).items()})
        k_sq = _rowdot(k, k) if tau else None
        adj_w = adj_s = None
        for i in range(N - 1, -1, -1):
            it = iter(flat[i * per:(i + 1) * per])

            def take(n):
                return [next(it) for _ in range(n)]

            W, S = take(L), (take(L) if momentum else None)
            xs, ds, g1s, eg2 = [k[i]] + take(L - 1), take(L), take(L - 1), take(L - 1)
            hs, rg1s, mixes = [q[i]] + take(L - 1), take(L - 1), [None] + take(L - 1)
            Ds, x_sq, clamps = ds, None, None
            if tau:
                Ds, x_sq = take(L), [k_sq[i]] + take(L - 1)
                clamps = [take(3) for _ in range(L)]
            if adj_w is None:
                adj = [torch.zeros_like(w) if g is None else g for w, g in zip(W + (S or []), d_states)]
                adj_w, adj_s = adj[:L], (adj[L:] if momentum else None)
            m = momentum
            g_w, g_s, g_D, g_x, d_cl, d_sl, d_bl, d_fl, d_ml = _update_backward(
                adj_w, adj_s, W, S, xs, Ds, c_last[i], s_last[i] if m else None, beta_last[i],
                f_last[i] if m else None, m_last[i] if m else None)
            g_q, g_qk, d_c, d_b, d_f = _read_backward(d_out[i], W, S, xs, Ds, hs, rg1s, mixes, qk_mix[i], c[i],
                                                      beta[i], f[i] if m else None, g_w, g_s, g_D, g_x)
            g_d = g_D
            if tau:  # Δ_l = φ δ_l
                g_d = []
                for l in range(L):
                    gd, gx = _soft_clamp_backward(g_D[l], xs[l], x_sq[l], ds[l], clamps[l])
                    g_d.append(gd)
                    g_x[l] += gx
            g_k, g_v = _errors_backward(g_d, g_x, W, xs, ds, g1s, eg2, g_w)
            for name, t in dict(q=g_q, k=g_k, v=g_v, qk_mix=g_qk, c=d_c, beta=d_b, c_last=d_cl, beta_last=d_bl,
                                f=d_f, s_last=d_sl, f_last=d_fl, m_last=d_ml).items():
                if t is not None:
                    grads[name][i] = t
            adj_w, adj_s = g_w, g_s
        gr = grads.get
        return (None, None, gr("q"), gr("k"), gr("v"), gr("qk_mix"), gr("c"), gr("beta"), gr("f"), gr("c_last"),
                gr("s_last"), gr("beta_last"), gr("f_last"), gr("m_last"), *adj_w, *(adj_s or []))


@torch.compiler.disable  # a Python loop over chunks: torch.compile runs it eagerly
def chunk_scan(tau, q, k, v, qk_mix, c, beta, f, c_last, s_last, beta_last, f_last, m_last, *states):
    """:class:`TitansChunkScan` (the reads of every chunk and the memory after them); without a graph to
    build (no grad mode or no input requiring one) nothing is kept for a backward."""
    inputs = (q, k, v, qk_mix, c, beta, f, c_last, s_last, beta_last, f_last, m_last, *states)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return TitansChunkScan.apply(tau, grad, *inputs)
