"""The sequential core of the chunked TTT scan as autograd Functions with a hand-written backward.

Across mini-batches only the fast weights are sequential. For TTT-Linear (x̃ = [x, 1], W̃ = [W; b])
one step is

    G_i = ∇LN-L2(K̃_i W̃_i, t_i),   o_i = Q_i + LN_{γ,β}(Q̃_i W̃_i − M_i G_i),   W̃_{i+1} = W̃_i − D_i G_i

with D_i = (s_b η_i ⊙ K̃_i)ᵀ and M_i = tril(s ηᵀ ⊙ (QKᵀ + 1)); the backward runs the recursion
Ā_i = Ā_{i+1} + K̃_iᵀ J_iᵀ(Ḡ_i − D_iᵀ Ā_{i+1}) + Q̃_iᵀ ∂L/∂(Q̃_i W̃_i) in reverse (Ā: ∂L/∂W̃, J_i the
LN-L2 Jacobian and the read-out LayerNorm's applied in closed form per token), so the per-mini-batch
work is a handful of [B·H]-batched (b × d) matmuls and elementwise ops with no autograd graph.
The (b × d) per-token quantities of the loop are kept; the weights are not (``_Anchors``: updated in
place, kept every 16 mini-batches, the others recovered in the backward by undoing the update), so
the scan never holds N·d² (let alone T·d²) per head.

On CPU the loop's cost is the number of operations and the memory they touch, not their arithmetic:
each elementwise op on a (B·H, b, d) tile costs about the same whatever it computes. So the row
reductions are sums with 1/d folded into the next op, products are fused into ``addcmul``/``baddbmm``
with ``out=`` buffers, per-mini-batch tensors are kept by reference (never copied), gradients that
are sums over the sequence are gathered while their tiles are in cache, and every product is taken
per mini-batch (one batched matmul over all N·B·H small matrices streams them from memory and is
slower). Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import functools

import torch

from ...common.parts import GELU_C


GELU_C3 = 0.044715 * GELU_C  # u = c x + c·0.044715 x³ = x (c + GELU_C3 x²); u' = c + 3·GELU_C3 x²


def _autocast_off(fn):
    """Run ``fn(ctx, *tensors)`` with autocast off on the tensors' device: the scan computes in its own
    dtype (float32), and autocast would turn its matmuls into bf16 ones (``out=`` buffers then clash)."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper


# ------------------------------------------------------------------ LayerNorm-fused L2 gradient


def _ln_l2_grad(z, w_bt, w_sq, eps):
    """g = ∂/∂z ½‖γ LN(z) + β − t‖² = r (ĝ − mean ĝ − x̂ mean(ĝ x̂)), ĝ = γ² x̂ + γ(β − t) (w_bt = γ(β − t),
    w_sq = γ²), with what its backward needs: (g, x̂, r, ĝ, Σ ĝ x̂)."""
    d = z.shape[-1]
    x_hat, _, rstd = torch.native_layer_norm(z, (d,), None, None, eps)
    g_hat = torch.addcmul(w_bt, w_sq, x_hat)
    s_gx = (g_hat * x_hat).sum(-1, keepdim=True)
    g = torch.addcmul(g_hat, x_hat, s_gx, value=-1.0 / d).sub_(g_hat.sum(-1, keepdim=True), alpha=1.0 / d)
    return g.mul_(rstd), x_hat, rstd, g_hat, s_gx


def _ln_l2_grad_backward(u, saved, w_sq, dz_out):
    """Backward of :func:`_ln_l2_grad` for u = ∂L/∂g: writes ∂L/∂z into ``dz_out`` (z enters through x̂,
    in ĝ and in g, and through r) and returns a = ∂L/∂ĝ = r (u − mean u − x̂ mean(u x̂))."""
    g, x_hat, r, g_hat, s_gx = saved
    d = u.shape[-1]
    s_ux = (u * x_hat).sum(-1, keepdim=True)
    a = torch.addcmul(u, x_hat, s_ux, value=-1.0 / d).sub_(u.sum(-1, keepdim=True), alpha=1.0 / d).mul_(r)
    d_xhat = w_sq * a
    d_xhat.addcmul_(u, s_gx * r, value=-1.0 / d).addcmul_(g_hat, s_ux * r, value=-1.0 / d)
    s = (u * g).sum(-1, keepdim=True).add_((d_xhat * x_hat).sum(-1, keepdim=True))
    dz = d_xhat.addcmul_(x_hat, s, value=-1.0 / d)  # x̂ has zero mean: the mean below is d_x̂'s
    dz.sub_(dz.sum(-1, keepdim=True), alpha=1.0 / d)
    torch.mul(dz, r, out=dz_out)
    return a


def _ln_params(ln_w, ln_b, tgt, B):
    """γ, β per (batch·head) row, γ², and β − t, γ(β − t) for every mini-batch at once."""
    H, _, d = ln_w.shape
    lw = ln_w.expand(B, H, 1, d).reshape(B * H, 1, d)
    lb = ln_b.expand(B, H, 1, d).reshape(B * H, 1, d)
    bt = lb - tgt
    return lw, lb, lw * lw, bt, lw * bt


class _LNParamGrads:
    """∂L/∂t, ∂L/∂γ, ∂L/∂β of ĝ = γ(γ x̂ + β − t), gathered mini-batch by mini-batch from a = ∂L/∂ĝ while
    a and x̂ are in cache: ∂L/∂t = −γ a, ∂L/∂γ = Σ a (2γ x̂ + β − t), ∂L/∂β = Σ γ a (Σ over mini-batches,
    batch rows and tokens)."""

    def __init__(self, lw, bt, B):
        self.neg_lw, self.two_lw, self.bt, self.B = -lw, 2 * lw, bt, B
        self.d_tgt = bt.new_empty(bt.shape)
        self.d_lw = lw.new_zeros(lw.shape)

    def add(self, i, a, x_hat):
        torch.mul(a, self.neg_lw, out=self.d_tgt[i])
        self.d_lw += (a * torch.addcmul(self.bt[i], self.two_lw, x_hat)).sum(1, keepdim=True)

    def result(self, d_lb_read):
        """(∂L/∂t [N, B·H, b, d], ∂L/∂γ, ∂L/∂β [H, 1, d]); ``d_lb_read`` = Σ ∂L/∂o is the read-out
        o = q + γ LN(z̄) + β's ∂L/∂β (its ∂L/∂γ is added to ``d_lw`` by :func:`_read_out_backward`)."""
        N, BH, b, d = self.d_tgt.shape
        B, H = self.B, BH // self.B
        d_lb = self.d_tgt.view(N * B, H, b, d).sum(0).sum(1, keepdim=True).neg_().add_(d_lb_read)
        return self.d_tgt, self.d_lw.view(B, H, 1, d).sum(0), d_lb


def _head_sum(d_out, H, d):
    """Σ over batch rows and tokens of ∂L/∂o [B, H, T, d] (None: no gradient) → [H, 1, d]."""
    return 0.0 if d_out is None else d_out.sum((0, 2)).view(H, 1, d)


def _read_out(z_bar, q, lw, lb, out, eps):
    """The layer's read o = q + γ LN(z̄) + β of one mini-batch into ``out``; returns (x̂, r) of the LN."""
    x_hat, _, rstd = torch.native_layer_norm(z_bar, (z_bar.shape[-1],), None, None, eps)
    torch.addcmul(lb, lw, x_hat, out=out).add_(q)
    return x_hat, rstd


def _read_out_backward(d_o, x_hat, rstd, lw, d_lw, out):
    """Backward of :func:`_read_out` for d_o = ∂L/∂o: ∂L/∂z̄ = r (γd_o − mean(γd_o) − x̂ mean(γd_o x̂))
    into ``out``, Σ d_o x̂ added to ``d_lw``; ∂L/∂q = d_o and ∂L/∂β = Σ d_o are the caller's."""
    d = d_o.shape[-1]
    g_do = lw * d_o
    s = (g_do * x_hat).sum(-1, keepdim=True)
    dz = torch.addcmul(g_do, x_hat, s, value=-1.0 / d).sub_(g_do.sum(-1, keepdim=True), alpha=1.0 / d)
    torch.mul(dz, rstd, out=out)
    d_lw += (d_o * x_hat).sum(1, keepdim=True)


class _Anchors:
    """The fast weights W̃_i of the backward, recovered instead of stored: the forward updates W̃ in place
    and keeps it only every ``every`` mini-batches; the backward walks back from the nearest kept
    one, W̃_i = W̃_{i+1} + D_i G_i (the update undone with the same G_i). N·d² per head is never stored
    (for TTT-MLP that was most of the layer's activation memory), the weights stay in cache, and the
    rounding of the undo (≤ ``every`` steps, one ulp each) is far below float32's own noise."""

    every = 16

    def __init__(self, n, kept=None):
        self.n, self.kept = n, {} if kept is None else kept

    def keep(self, i, *weights):
        if i % self.every == 0 or i == self.n:
            self.kept[i] = weights if i == self.n else tuple(w.clone() for w in weights)

    def tensors(self):
        return [w for i in sorted(self.kept) for w in self.kept[i]]

    @classmethod
    def restore(cls, n, saved, per_step=1):
        """Splits ``saved`` (the tensors after ``ctx.saved_tensors``' fixed ones) into (anchors, the rest)."""
        steps = sorted({*range(0, n, cls.every), n})
        count = len(steps) * per_step
        flat = saved[:count]
        return cls(n, {i: tuple(flat[j * per_step:(j + 1) * per_step]) for j, i in enumerate(steps)}), saved[count:]

    def before(self, i, current, undo):
        """The weights W̃_i (a tuple) from W̃_{i+1} (``current``; None at the start of the backward): a copy
        of the kept ones where i is kept, else ``undo(*current)``."""
        if i in self.kept:
            return tuple(w.clone() for w in self.kept[i])
        if current is None:
            current = tuple(w.clone() for w in self.kept[self.n])
        return undo(*current)


def _padded_kq(k, q):
    """[K̃; Q̃] per mini-batch: [N, B·H, 2b, d+1] from k, q [N, B, H, b, d] (any strides), x̃ = [x, 1]."""
    N, B, H, b, d = k.shape
    kq = k.new_empty(N, B, H, 2 * b, d + 1)
    kq[..., :b, :d], kq[..., b:, :d], kq[..., d] = k, q, 1.0
    return kq.view(N, B * H, 2 * b, d + 1)


def _tiles(x, N):
    """[B, H, N·b, d] in token order as [N, B·H, b, d] per-mini-batch tiles (a strided view where possible)."""
    B, H, T, d = x.shape
    return x.unflatten(2, (N, T // N)).permute(2, 0, 1, 3, 4).reshape(N, B * H, T // N, d)


class LinearScan(torch.autograd.Function):
    """N full mini-batches of TTT-Linear in the dual form.

    W: [B,H,d+1,d]; k, q, tgt: [N,B,H,b,d] (any strides); mix = tril(s ηᵀ ⊙ (QKᵀ+1)): [N,B,H,b,b];
    slr = s_b η: [N,B,H,b] (the update W̃ −= D G with D = (slr ⊙ K̃)ᵀ); ln_w, ln_b: [H,1,d].
    Returns (o = Q + LN_{γ,β}(Z̄) [B,H,N·b,d], W̃_N): the read-out LayerNorm is taken per mini-batch
    here, where Z̄_i is in cache, and o is written in token order.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, W, k, q, tgt, mix, slr, ln_w, ln_b, eps=1e-6):
        N, B, H, b, d = k.shape
        d1, BH = d + 1, B * H
        kq3 = _padded_kq(k, q)  # [K̃; Q̃]
        mix3, slr3, tgt3 = mix.reshape(N, BH, b, b), slr.reshape(N, BH, b, 1), tgt.reshape(N, BH, b, d)
        lw, lb, w_sq, bt, w_bt = _ln_params(ln_w, ln_b, tgt3, B)
        w = W.reshape(BH, d1, d).clone()  # updated in place; the backward recovers W̃_i (see _Anchors)
        anchors = _Anchors(N)
        out = W.new_empty(B, H, N * b, d)
        out_tiles = _tiles(out, N)
        keep = []
        for i in range(N):
            anchors.keep(i, w)
            zz = torch.bmm(kq3[i], w)  # [K̃; Q̃] W̃_i
            saved = _ln_l2_grad(zz[:, :b], w_bt[i], w_sq, eps)
            g = saved[0]
            z_bar = torch.baddbmm(zz[:, b:], mix3[i], g, alpha=-1.0)
            keep += [*saved, *_read_out(z_bar, kq3[i, :, b:, :d], lw, lb, out_tiles[i], eps)]
            w.baddbmm_((slr3[i] * kq3[i, :, :b]).transpose(-1, -2), g, alpha=-1.0)
        anchors.keep(N, w)
        ctx.save_for_backward(kq3, mix3, slr3, lw, bt, *anchors.tensors(), *keep)
        ctx.shapes = (N, B, H, b, d)
        return out, w.view(B, H, d1, d)

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out, d_W):
        kq3, mix3, slr3, lw, bt, *keep = ctx.saved_tensors
        N, B, H, b, d = ctx.shapes
        anchors, keep = _Anchors.restore(N, keep)
        BH, d1, w_sq = B * H, d + 1, lw * lw
        A = d_W.reshape(BH, d1, d).clone() if d_W is not None else kq3.new_zeros(BH, d1, d)  # ∂L/∂W̃_{i+1}
        d_lb_read = _head_sum(d_out, H, d)
        d_out = kq3.new_zeros(N, BH, b, d) if d_out is None else _tiles(d_out, N)
        dzz = kq3.new_empty(BH, 2 * b, d)  # [∂L/∂(K̃W̃); ∂L/∂(Q̃W̃)]
        d_kq, d_mix, d_slr = kq3.new_empty(N, BH, 2 * b, d), torch.empty_like(mix3), torch.empty_like(slr3)
        ln_grads = _LNParamGrads(lw, bt, B)
        ws = None
        for i in range(N - 1, -1, -1):
            saved, (x_o, r_o) = keep[7 * i:7 * i + 5], keep[7 * i + 5:7 * i + 7]
            k_t, g = kq3[i, :, :b], saved[0]
            d_t = slr3[i] * k_t  # Dᵀ
            ws = anchors.before(i, ws, lambda w: (w.baddbmm_(d_t.transpose(-1, -2), g),))  # W̃_{i+1} + D_i G_i
            w = ws[0]
            do = dzz[:, b:]
            _read_out_backward(d_out[i], x_o, r_o, lw, ln_grads.d_lw, do)
            torch.bmm(do, g.transpose(-1, -2), out=d_mix[i])  # negated below
            GA = torch.bmm(g, A.transpose(-1, -2))  # −(∂L/∂D)ᵀ
            torch.sum(GA * k_t, -1, keepdim=True, out=d_slr[i])  # negated below
            u = torch.bmm(mix3[i].transpose(-1, -2), do)
            u = torch.baddbmm(u, d_t, A, beta=-1.0, alpha=-1.0)  # ∂L/∂G_i
            ln_grads.add(i, _ln_l2_grad_backward(u, saved, w_sq, dzz[:, :b]), saved[1])
            torch.bmm(dzz, w[:, :d].transpose(-1, -2), out=d_kq[i])
            d_kq[i, :, :b].addcmul_(slr3[i], GA[..., :d], value=-1.0)  # K̃ in D
            d_kq[i, :, b:] += d_out[i]  # o = q + …
            A.baddbmm_(kq3[i].transpose(-1, -2), dzz)
        d_tgt, d_lw, d_lb = ln_grads.result(d_lb_read)
        shape = (N, B, H)
        d_kq = d_kq.view(*shape, 2 * b, d)
        return (A.view(B, H, d1, d), d_kq[..., :b, :], d_kq[..., b:, :], d_tgt.view(*shape, b, d),
                d_mix.neg_().view(*shape, b, b), d_slr.neg_().view(*shape, b), d_lw, d_lb, None)


@torch.compiler.disable  # a Python loop over mini-batches: torch.compile runs it eagerly
def linear_scan(W, k, q, tgt, mix, slr, ln_w, ln_b, eps: float = 1e-6):
    """:class:`LinearScan` (the read-out of every token [B,H,N·b,d] and the final weights)."""
    return LinearScan.apply(W, k, q, tgt, mix, slr, ln_w, ln_b, eps)


# ------------------------------------------------------------------------------------ TTT-MLP


@functools.lru_cache(maxsize=None)
def _consts(dtype, device):
    """0-dim tensors c, ½, 1 (the constant inputs of ``addcmul``/``add``), made once per dtype and device."""
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in (GELU_C, 0.5, 1.0))


def _gelu_parts(x, out, second: bool = False):
    """gelu(x) (tanh form, the official constants) into ``out`` and gelu'(x), from one tanh:
    u = x (c + c₃x²), t = tanh u, gelu = ½x(1 + t), gelu' = ½(1 + t) + ½x(1 − t²)u', u' = c + 3c₃x²
    (gelu' is :func:`common.parts.gelu_tanh_grad`, the closed form of the official TTT-MLP). Returns gelu' and,
    with ``second``, (t, u', 1 − t²) for :func:`_gelu_second`. Temporaries are reused in place: on CPU
    a fresh (b × h) tensor per op costs more than the op."""
    c, half, one = _consts(x.dtype, x.device)
    du = torch.addcmul(c, x, x, value=3 * GELU_C3)
    t = torch.addcmul(c, x, x, value=GELU_C3).mul_(x).tanh_()
    half_1t = torch.add(half, t, alpha=0.5)
    torch.mul(x, half_1t, out=out)
    sech2 = torch.addcmul(one, t, t, value=-1.0)
    s_du = sech2 * du if second else sech2.mul_(du)
    return half_1t.addcmul_(x, s_du, value=0.5), ((t, du, sech2) if second else None)


def _gelu_second(x, parts, scale):
    """scale ⊙ gelu''(x), gelu'' = (1 − t²)(u' + x(3c₃x − t u'²)), from :func:`_gelu_parts` (uses up its parts)."""
    t, du, sech2 = parts
    inner = torch.mul(x, 3 * GELU_C3).addcmul_(t.mul_(du), du, value=-1.0)
    return inner.mul_(x).add_(du).mul_(sech2).mul_(scale)


def _x2_tiles(z1):
    """The per-mini-batch [X̃2; X̄2] [B·H, 2b, h + 1] for z1 [B·H, b, h], its ones column (x̃ = [x, 1]) set:
    one tensor, so that the backward copies both into its Ā2 product at once."""
    BH, b, h = z1.shape
    out = z1.new_empty(BH, 2 * b, h + 1)
    out[..., h] = 1.0
    return out


class MLPScan(torch.autograd.Function):
    """N full mini-batches of TTT-MLP in the dual form (both layers, as ops.ttt.chunk._segment_mlp).

    W1: [B,H,d+1,h], W2: [B,H,h+1,d]; k, q, tgt: [N,B,H,b,d]; eta = tril(s ηᵀ), mix1 = eta ⊙ (QKᵀ+1):
    [N,B,H,b,b]; s_lr = s_b η: [N,B,H,b] (down1 = (s_lr ⊙ K̃)ᵀ). Returns (o = Q + LN_{γ,β}(Z̄)
    [B,H,N·b,d], W̃1_N, W̃2_N), as :class:`LinearScan`. Per mini-batch:

        Z1 = K̃W̃1, X̃2 = [gelu(Z1), 1], G2 = ∇LN-L2(X̃2 W̃2), G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)
        Z̄1 = Q̃W̃1 − mix1 G1, X̄2 = [gelu(Z̄1), 1], Z̄ = X̄2 W̃2 − (eta ⊙ X̄2 X̃2ᵀ) G2
        W̃1 ← W̃1 − down1 G1,  W̃2 ← W̃2 − X̃2ᵀ (s_lr ⊙ G2)
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, W1, W2, k, q, tgt, eta, mix1, s_lr, ln_w, ln_b, eps=1e-6):
        N, B, H, b, d = k.shape
        d1, h, BH = d + 1, W1.shape[-1], B * H
        kq3, tgt3 = _padded_kq(k, q), tgt.reshape(N, BH, b, d)  # [K̃; Q̃]
        eta3, mix3, slr3 = eta.reshape(N, BH, b, b), mix1.reshape(N, BH, b, b), s_lr.reshape(N, BH, b, 1)
        lw, lb, w_sq, bt, w_bt = _ln_params(ln_w, ln_b, tgt3, B)
        w1, w2 = W1.reshape(BH, d1, h).clone(), W2.reshape(BH, h + 1, d).clone()  # updated in place (_Anchors)
        anchors = _Anchors(N)
        out = W1.new_empty(B, H, N * b, d)
        out_tiles = _tiles(out, N)
        keep = []
        for i in range(N):
            anchors.keep(i, w1, w2)
            zz = torch.bmm(kq3[i], w1)  # [K̃; Q̃] W̃1
            z1, z1q = zz[:, :b], zz[:, b:]
            x2s = _x2_tiles(z1)
            x2a, x2bar_a = x2s[:, :b], x2s[:, b:]  # [gelu(·), 1], filled below
            gp, parts = _gelu_parts(z1, x2a[..., :h], second=True)
            ln_saved = _ln_l2_grad(torch.bmm(x2a, w2), w_bt[i], w_sq, eps)
            g2 = ln_saved[0]
            M = torch.bmm(g2, w2[:, :h].transpose(-1, -2))
            g1 = M * gp
            m_gpp = _gelu_second(z1, parts, M)  # M ⊙ gelu''(Z1), for ∂G1/∂Z1
            z1bar = torch.baddbmm(z1q, mix3[i], g1, alpha=-1.0)
            gp_bar, _ = _gelu_parts(z1bar, x2bar_a[..., :h])
            P = torch.bmm(x2bar_a, x2a.transpose(-1, -2))
            z_bar = torch.baddbmm(torch.bmm(x2bar_a, w2), eta3[i] * P, g2, alpha=-1.0)
            read = _read_out(z_bar, kq3[i, :, b:, :d], lw, lb, out_tiles[i], eps)
            keep += [x2s, gp, m_gpp, g1, gp_bar, P, *read, *ln_saved]
            w1.baddbmm_((slr3[i] * kq3[i, :, :b]).transpose(-1, -2), g1, alpha=-1.0)
            w2.baddbmm_(x2a.transpose(-1, -2), slr3[i] * g2, alpha=-1.0)
        anchors.keep(N, w1, w2)
        ctx.save_for_backward(kq3, eta3, mix3, slr3, lw, bt, *anchors.tensors(), *keep)
        ctx.shapes = (N, B, H, b, d, h)
        return out, w1.view(B, H, d1, h), w2.view(B, H, h + 1, d)

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out, d_W1, d_W2):
        kq3, eta3, mix3, slr3, lw, bt, *keep = ctx.saved_tensors
        N, B, H, b, d, h = ctx.shapes
        anchors, keep = _Anchors.restore(N, keep, 2)
        BH, d1, w_sq, n = B * H, d + 1, lw * lw, len(keep) // N
        d_lb_read = _head_sum(d_out, H, d)
        d_out = kq3.new_zeros(N, BH, b, d) if d_out is None else _tiles(d_out, N)
        A1 = kq3.new_zeros(BH, d1, h) if d_W1 is None else d_W1.reshape(BH, d1, h).clone()  # ∂L/∂W̃1_{i+1}
        A2 = kq3.new_zeros(BH, h + 1, d) if d_W2 is None else d_W2.reshape(BH, h + 1, d).clone()
        d_kq = kq3.new_empty(N, BH, 2 * b, d)
        d_eta, d_mix, d_slr = (torch.empty_like(t) for t in (eta3, mix3, slr3))
        ln_grads = _LNParamGrads(lw, bt, B)
        dzz = kq3.new_empty(BH, 2 * b, h)  # [∂L/∂Z1; ∂L/∂Z̄1]
        # Ā2 += X̃2ᵀ ∂L/∂Z2 + X̄2ᵀ ∂L/∂Z̄ + [∂L/∂M, 0]ᵀ G2 as one product (one pass over Ā2, not three):
        # Ā2 += X̃2ᵀ ∂L/∂Z2 + X̄2ᵀ ∂L/∂Z̄ + [∂L/∂M, 0]ᵀ G2 as one product (one pass over Ā2, not three)
        lhs = kq3.new_empty(BH, 3 * b, h + 1)  # [X̃2; X̄2; [∂L/∂M, 0]]
        rhs = kq3.new_empty(BH, 3 * b, d)  # [∂L/∂Z2; ∂L/∂Z̄; G2]
        lhs[:, 2 * b:, h] = 0.0
        dz2, dM = rhs[:, :b], lhs[:, 2 * b:]
        w12 = None
        for i in range(N - 1, -1, -1):
            x2s, gp, m_gpp, g1, gp_bar, P, x_o, r_o, *ln_saved = keep[n * i:n * (i + 1)]
            xa, xba = x2s[:, :b], x2s[:, b:]
            g2 = ln_saved[0]
            et, slr, k_t = eta3[i], slr3[i], kq3[i, :, :b]
            do = rhs[:, b:2 * b]  # ∂L/∂Z̄
            _read_out_backward(d_out[i], x_o, r_o, lw, ln_grads.d_lw, do)
            slr_g2, d_t = slr * g2, slr * k_t  # V, down1ᵀ

            def undo(w1, w2):  # W̃1_i = W̃1_{i+1} + down1 G1, W̃2_i = W̃2_{i+1} + X̃2ᵀ(s_lr ⊙ G2)
                return w1.baddbmm_(d_t.transpose(-1, -2), g1), w2.baddbmm_(xa.transpose(-1, -2), slr_g2)

            w12 = anchors.before(i, w12, undo)
            w1, w2 = w12
            # W̃2' = W̃2 − X̃2ᵀ V, V = s_lr ⊙ G2: ∂L/∂V = −X̃2 Ā2, ∂L/∂X̃2 ∋ −V Ā2ᵀ (Ā2 before it is updated)
            XA = torch.bmm(xa, A2)
            torch.sum(g2 * XA, -1, keepdim=True, out=d_slr[i])  # negated below
            neg_dX2a = torch.bmm(slr_g2, A2.transpose(-1, -2))  # −∂L/∂X̃2, completed below
            # the read Z̄ = X̄2 W̃2 − S G2, S = eta ⊙ P, P = X̄2 X̃2ᵀ
            dS = torch.bmm(do, g2.transpose(-1, -2))  # −∂L/∂S
            torch.mul(dS, P, out=d_eta[i])  # negated below
            dP = et * dS  # −∂L/∂P
            neg_dG2 = torch.bmm((et * P).transpose(-1, -2), do).addcmul_(slr, XA)  # −∂L/∂G2, completed below
            dX2bar = torch.bmm(do, w2.transpose(-1, -2)).baddbmm_(dP, xa, alpha=-1.0)
            neg_dX2a.baddbmm_(dP.transpose(-1, -2), xba)
            dZ1bar = torch.mul(dX2bar[..., :h], gp_bar, out=dzz[:, b:])
            torch.bmm(dZ1bar, g1.transpose(-1, -2), out=d_mix[i])  # negated below
            # W̃1' = W̃1 − down1 G1, Z̄1 = Q̃W̃1 − mix1 G1: ∂L/∂G1; G1 = M ⊙ gelu'(Z1), M = G2 W2ᵀ
            GA1 = torch.bmm(g1, A1.transpose(-1, -2))  # −(∂L/∂down1)ᵀ
            d_slr[i] += (GA1 * k_t).sum(-1, keepdim=True)  # negated below
            dG1 = torch.bmm(mix3[i].transpose(-1, -2), dZ1bar)
            dG1 = torch.baddbmm(dG1, d_t, A1, beta=-1.0, alpha=-1.0)
            torch.mul(dG1, gp, out=dM[..., :h])
            dG2 = torch.baddbmm(neg_dG2, dM, w2, beta=-1.0)
            # G2 = ∇LN-L2(Z2), Z2 = X̃2 W̃2
            ln_grads.add(i, _ln_l2_grad_backward(dG2, ln_saved, w_sq, dz2), ln_saved[1])
            lhs[:, :2 * b], rhs[:, 2 * b:] = x2s, g2  # (a saved tensor is never written to)
            A2.baddbmm_(lhs.transpose(-1, -2), rhs)
            dX2a = neg_dX2a.baddbmm_(dz2, w2.transpose(-1, -2), beta=-1.0)
            # Z1 → X2 = gelu(Z1) and G1: ∂L/∂Z1 = ∂L/∂X2 ⊙ gelu'(Z1) + ∂L/∂G1 ⊙ M ⊙ gelu''(Z1)
            torch.addcmul(dG1 * m_gpp, dX2a[..., :h], gp, out=dzz[:, :b])
            torch.bmm(dzz, w1[:, :d].transpose(-1, -2), out=d_kq[i])
            d_kq[i, :, :b].addcmul_(slr, GA1[..., :d], value=-1.0)  # K̃ in down1
            d_kq[i, :, b:] += d_out[i]  # o = q + …
            A1.baddbmm_(kq3[i].transpose(-1, -2), dzz)
        d_tgt, d_lw, d_lb = ln_grads.result(d_lb_read)
        shape = (N, B, H)
        d_kq = d_kq.view(*shape, 2 * b, d)
        return (A1.view(B, H, d1, h), A2.view(B, H, h + 1, d), d_kq[..., :b, :], d_kq[..., b:, :],
                d_tgt.view(*shape, b, d), d_eta.neg_().view(*shape, b, b), d_mix.neg_().view(*shape, b, b),
                d_slr.neg_().view(*shape, b), d_lw, d_lb, None)


@torch.compiler.disable  # a Python loop over mini-batches: torch.compile runs it eagerly
def mlp_scan(W1, W2, k, q, tgt, eta, mix1, s_lr, ln_w, ln_b, eps: float = 1e-6):
    """:class:`MLPScan` (the read-out of every token [B,H,N·b,d] and the final weights of both layers)."""
    return MLPScan.apply(W1, W2, k, q, tgt, eta, mix1, s_lr, ln_w, ln_b, eps)
