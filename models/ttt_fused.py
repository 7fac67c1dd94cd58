"""The sequential core of the chunked TTT scan as autograd Functions with a hand-written backward.

Across mini-batches only the fast weights are sequential. Everything else, the reads
Z̄ = Q̃ W̃_i − M_i G_i and every gradient that does not feed the next weights, is done for all
mini-batches at once, outside the loop. For TTT-Linear (x̃ = [x, 1], W̃ = [W; b]) one step is

    G_i = ∇LN-L2(K̃_i W̃_i, t_i)          W̃_{i+1} = W̃_i − D_i G_i,   D_i = (s_b η_i ⊙ K̃_i)ᵀ

and its backward runs the recursion Ā_i = Ā_{i+1} + R_i + K̃_iᵀ J_iᵀ(Ḡ_i − D_iᵀ Ā_{i+1}) in reverse
(Ā: ∂L/∂W̃, R_i = Q̃_iᵀ ∂L/∂Z̄_i, J_i the LN-L2 Jacobian applied in closed form per token), so the
per-mini-batch work is a handful of batched (b × d) matmuls and elementwise ops with no autograd
graph; the (b × d) per-token quantities of the loop are stored, the weights W̃_i once per
mini-batch (N × d × d, never T × d × d). Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .parts import GELU_C


def _ln_l2_forward(z, tgt, w, b, eps):
    """g = ∂/∂z ½‖γ LN(z) + β − t‖² per token, with what its backward needs."""
    d = z.shape[-1]
    x_hat, _, rstd = torch.native_layer_norm(z, (d,), None, None, eps)
    resid = w * x_hat + b - tgt
    g_hat = resid * w
    g = (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True)) * rstd
    return g, x_hat, rstd, resid, g_hat



def _autocast_off(fn):
    """Run ``fn(ctx, *tensors)`` with autocast off on the tensors' device: the scan computes in its own
    dtype (float32), and autocast would turn its matmuls into bf16 ones (``out=`` buffers then clash)."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper


class LinearScan(torch.autograd.Function):
    """N full mini-batches of TTT-Linear in the dual form.

    W: [B,H,d+1,d]; kq = [K̃; Q̃]: [N,B,H,2b,d+1]; tgt: [N,B,H,b,d]; mix = tril(s ηᵀ ⊙ (QKᵀ+1)):
    [N,B,H,b,b]; down = D: [N,B,H,d+1,b]; ln_w, ln_b: [H,1,d]. Returns (Z̄ [N,B,H,b,d], W̃_N).
    Every product is taken per mini-batch ([B·H] batched matmuls stay in cache; one batched matmul
    over all N·B·H small matrices is slower on CPU).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, W, kq, tgt, mix, down, ln_w, ln_b, eps=1e-6):
        N, B, H, b2, d1 = kq.shape
        b, d, BH = b2 // 2, W.shape[-1], B * H
        kq3, tgt3 = kq.reshape(N, BH, b2, d1), tgt.reshape(N, BH, b, d)
        mix3, down3 = mix.reshape(N, BH, b, b), down.reshape(N, BH, d1, b)
        lw = ln_w.expand(B, H, 1, d).reshape(BH, 1, d)
        lb = ln_b.expand(B, H, 1, d).reshape(BH, 1, d)
        Ws = W.new_empty(N, BH, d1, d)
        out = W.new_empty(N, BH, b, d)
        saved = [W.new_empty(N, BH, b, d) for _ in range(4)]  # g, x̂, resid, ĝ
        rstd = W.new_empty(N, BH, b, 1)
        w = W.reshape(BH, d1, d)
        for i in range(N):
            Ws[i] = w
            zz = torch.bmm(kq3[i], w)
            g, x_hat, r, resid, g_hat = _ln_l2_forward(zz[:, :b], tgt3[i], lw, lb, eps)
            for buf, t in zip(saved, (g, x_hat, resid, g_hat)):
                buf[i] = t
            rstd[i] = r
            torch.baddbmm(zz[:, b:], mix3[i], g, alpha=-1.0, out=out[i])
            w = torch.baddbmm(w, down3[i], g, alpha=-1.0)
        ctx.save_for_backward(Ws, *saved, rstd, kq3, mix3, down3, lw)
        ctx.shapes = (N, B, H, b, d)
        return out.view(N, B, H, b, d), w.view(B, H, d1, d)

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out, d_W):
        Ws, G, x_hat, resid, g_hat, rstd, kq3, mix3, down3, lw = ctx.saved_tensors
        N, B, H, b, d = ctx.shapes
        BH, d1 = B * H, Ws.shape[-2]
        d_out = G.new_zeros(N, BH, b, d) if d_out is None else d_out.reshape(N, BH, b, d)
        A = d_W.reshape(BH, d1, d) if d_W is not None else Ws.new_zeros(BH, d1, d)  # ∂L/∂W̃_{i+1}
        w2 = lw * lw
        d_kq, d_mix, d_down = torch.empty_like(kq3), torch.empty_like(mix3), torch.empty_like(down3)
        a_all = torch.empty_like(G)
        m = (g_hat * x_hat).mean(-1, keepdim=True)
        for i in range(N - 1, -1, -1):
            g, xh, r, gh, do = G[i], x_hat[i], rstd[i], g_hat[i], d_out[i]
            g_t = g.transpose(-1, -2)
            torch.bmm(do, g_t, out=d_mix[i]).neg_()
            torch.bmm(A, g_t, out=d_down[i]).neg_()
            G_up = -torch.baddbmm(mix3[i].transpose(-1, -2) @ do, down3[i].transpose(-1, -2), A)  # ∂L/∂G_i
            # LayerNorm backward of G_i = g(K̃_i W̃_i): ∂L/∂ĝ = a, then through x̂ and σ
            G_x = (G_up * xh).mean(-1, keepdim=True)
            a = (G_up - G_up.mean(-1, keepdim=True) - xh * G_x) * r
            a_all[i] = a
            d_xhat = w2 * a - (m[i] * G_up + G_x * gh) * r
            d_std = (G_up * g).sum(-1, keepdim=True) + (d_xhat * xh).sum(-1, keepdim=True)
            dz = (d_xhat - d_xhat.mean(-1, keepdim=True)) * r - (d_std * r * (1.0 / d)) * xh
            dzz = torch.cat([dz, do], dim=1)
            torch.bmm(dzz, Ws[i].transpose(-1, -2), out=d_kq[i])
            A = torch.baddbmm(A, kq3[i].transpose(-1, -2), dzz)
        d_tgt = -lw * a_all
        d_lw = (a_all * (resid + lw * x_hat)).view(N, B, H, b, d).sum((0, 1, 3)).view(H, 1, d)
        d_lb = (lw * a_all).view(N, B, H, b, d).sum((0, 1, 3)).view(H, 1, d)
        shape = (N, B, H)
        return (A.view(B, H, d1, d), d_kq.view(*shape, 2 * b, d1), d_tgt.view(*shape, b, d),
                d_mix.view(*shape, b, b), d_down.view(*shape, d1, b), d_lw, d_lb, None)


@torch.compiler.disable  # a Python loop over mini-batches: torch.compile runs it eagerly
def linear_scan(W, kq, tgt, mix, down, ln_w, ln_b, eps: float = 1e-6):
    """:class:`LinearScan` (Z̄ of every mini-batch and the final weights)."""
    return LinearScan.apply(W, kq, tgt, mix, down, ln_w, ln_b, eps)


def _gelu_tanh_parts(x, second: bool = False):
    """gelu(x) (tanh form), gelu'(x) and optionally gelu''(x) from one tanh:
    t = tanh(c x (1 + 0.044715 x²)), gelu = ½x(1 + t), gelu' = ½(1 + t) + ½x(1 − t²)u', u' = c + 0.1070322243 x²
    (gelu' is :func:`parts.gelu_tanh_grad`, the closed form of the official TTT-MLP)."""
    x2 = x * x
    t = torch.tanh(GELU_C * x * (1 + 0.044715 * x2))
    du = GELU_C + 0.1070322243 * x2
    sech2 = 1 - t * t
    half_1t = 0.5 * (1 + t)
    d1 = 0.5 * x * (sech2 * du) + half_1t
    if not second:
        return x * half_1t, d1
    d2 = sech2 * (du + 0.5 * x * (2 * 0.1070322243 * x - 2 * t * du * du))
    return x * half_1t, d1, d2


def _pad1(x):
    return F.pad(x, (0, 1), value=1.0)


class MLPScan(torch.autograd.Function):
    """N full mini-batches of TTT-MLP in the dual form (both layers, as ttt_chunk._segment_mlp).

    W1: [B,H,d+1,h], W2: [B,H,h+1,d]; kq = [K̃; Q̃]: [N,B,H,2b,d+1]; tgt: [N,B,H,b,d];
    eta = tril(s ηᵀ), mix1 = eta ⊙ (QKᵀ+1): [N,B,H,b,b]; down1 = (s_b η ⊙ K̃)ᵀ: [N,B,H,d+1,b];
    s_lr = s_b η: [N,B,H,b,1]. Returns (Z̄ [N,B,H,b,d], W̃1_N, W̃2_N). Per mini-batch:

        Z1 = K̃W̃1, X̃2 = [gelu(Z1), 1], G2 = ∇LN-L2(X̃2 W̃2), G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)
        Z̄1 = Q̃W̃1 − mix1 G1, X̄2 = [gelu(Z̄1), 1], Z̄ = X̄2 W̃2 − (eta ⊙ X̄2 X̃2ᵀ) G2
        W̃1 ← W̃1 − down1 G1,  W̃2 ← W̃2 − (s_lr ⊙ X̃2)ᵀ G2
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, W1, W2, kq, tgt, eta, mix1, down1, s_lr, ln_w, ln_b, eps=1e-6):
        N, B, H, b2, d1 = kq.shape
        b, d, h, BH = b2 // 2, W2.shape[-1], W1.shape[-1], B * H
        kq3, tgt3 = kq.reshape(N, BH, b2, d1), tgt.reshape(N, BH, b, d)
        eta3, mix3 = eta.reshape(N, BH, b, b), mix1.reshape(N, BH, b, b)
        down3, slr3 = down1.reshape(N, BH, d1, b), s_lr.reshape(N, BH, b, 1)
        lw = ln_w.expand(B, H, 1, d).reshape(BH, 1, d)
        lb = ln_b.expand(B, H, 1, d).reshape(BH, 1, d)
        w1, w2 = W1.reshape(BH, d1, h), W2.reshape(BH, h + 1, d)
        out = W1.new_empty(N, BH, b, d)
        keep = []
        for i in range(N):
            zz = torch.bmm(kq3[i], w1)
            z1, z1q = zz[:, :b], zz[:, b:]
            x2, gp, gpp = _gelu_tanh_parts(z1, second=True)  # gelu' is both G1's factor and gelu's derivative
            x2a = _pad1(x2)
            g2, x_hat, rstd, resid, g_hat = _ln_l2_forward(torch.bmm(x2a, w2), tgt3[i], lw, lb, eps)
            M = torch.bmm(g2, w2[:, :h].transpose(-1, -2))
            g1 = M * gp
            z1bar = torch.baddbmm(z1q, mix3[i], g1, alpha=-1.0)
            x2bar, gp_bar = _gelu_tanh_parts(z1bar)
            x2bar_a = _pad1(x2bar)
            P = torch.bmm(x2bar_a, x2a.transpose(-1, -2))
            torch.baddbmm(torch.bmm(x2bar_a, w2), eta3[i] * P, g2, alpha=-1.0, out=out[i])
            keep.append((w1, w2, gp, gpp, M, g1, gp_bar, x2a, x2bar_a, P, g2, x_hat, rstd, resid, g_hat))
            w1 = torch.baddbmm(w1, down3[i], g1, alpha=-1.0)
            w2 = torch.baddbmm(w2, (slr3[i] * x2a).transpose(-1, -2), g2, alpha=-1.0)
        # through save_for_backward (not ctx attributes) so that scan checkpointing can drop them
        ctx.save_for_backward(kq3, eta3, mix3, down3, slr3, lw, *(t for step in keep for t in step))
        ctx.shapes = (N, B, H, b, d, h)
        return out.view(N, B, H, b, d), w1.view(B, H, d1, h), w2.view(B, H, h + 1, d)

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out, d_W1, d_W2):
        kq3, eta3, mix3, down3, slr3, lw, *flat = ctx.saved_tensors
        N, B, H, b, d, h = ctx.shapes
        n = len(flat) // N
        keep = [flat[i * n:(i + 1) * n] for i in range(N)]
        BH, d1 = B * H, kq3.shape[-1]
        d_out = kq3.new_zeros(N, BH, b, d) if d_out is None else d_out.reshape(N, BH, b, d)
        A1 = kq3.new_zeros(BH, d1, h) if d_W1 is None else d_W1.reshape(BH, d1, h)
        A2 = kq3.new_zeros(BH, h + 1, d) if d_W2 is None else d_W2.reshape(BH, h + 1, d)
        w_sq = lw * lw
        d_kq, d_eta, d_mix, d_down = (torch.empty_like(t) for t in (kq3, eta3, mix3, down3))
        d_slr = torch.empty_like(slr3)
        a_all, terms = [None] * N, [None] * N
        for i in range(N - 1, -1, -1):
            w1, w2, gp, gpp, M, g1, gp_bar, x2a, x2bar_a, P, g2, xh, r, resid, gh = keep[i]
            do, et = d_out[i], eta3[i]
            # reads: Z̄ = X̄2 W̃2 − (eta ⊙ P) G2,  P = X̄2 X̃2ᵀ
            dW2 = torch.baddbmm(A2, x2bar_a.transpose(-1, -2), do)
            dS = -torch.bmm(do, g2.transpose(-1, -2))
            dG2 = -torch.bmm((et * P).transpose(-1, -2), do)
            dP = et * dS
            torch.mul(dS, P, out=d_eta[i])
            dX2bar = torch.baddbmm(torch.bmm(do, w2.transpose(-1, -2)), dP, x2a)
            dX2a = torch.bmm(dP.transpose(-1, -2), x2bar_a)
            dZ1bar = dX2bar[..., :h] * gp_bar
            torch.bmm(dZ1bar, g1.transpose(-1, -2), out=d_mix[i]).neg_()
            dG1 = -torch.bmm(mix3[i].transpose(-1, -2), dZ1bar)
            # weight updates: W̃1' = W̃1 − down1 G1, W̃2' = W̃2 − Uᵀ G2 with U = s_lr ⊙ X̃2
            dG1 = torch.baddbmm(dG1, down3[i].transpose(-1, -2), A1, alpha=-1.0)
            torch.bmm(A1, g1.transpose(-1, -2), out=d_down[i]).neg_()
            dU = -torch.bmm(g2, A2.transpose(-1, -2))
            dG2 = torch.baddbmm(dG2, slr3[i] * x2a, A2, alpha=-1.0)
            dX2a = dX2a + slr3[i] * dU
            d_slr[i] = (dU * x2a).sum(-1, keepdim=True)
            # G1 = M ⊙ gelu'(Z1), M = G2 W2ᵀ
            dM = dG1 * gp
            dZ1 = dG1 * M * gpp
            dG2 = torch.baddbmm(dG2, dM, w2[:, :h])
            dW2[:, :h] += torch.bmm(dM.transpose(-1, -2), g2)
            # G2 = ∇LN-L2(Z2): LayerNorm backward
            G_x = (dG2 * xh).mean(-1, keepdim=True)
            a = (dG2 - dG2.mean(-1, keepdim=True) - xh * G_x) * r
            m = (gh * xh).mean(-1, keepdim=True)
            d_xhat = w_sq * a - (m * dG2 + G_x * gh) * r
            d_std = (dG2 * g2).sum(-1, keepdim=True) + (d_xhat * xh).sum(-1, keepdim=True)
            dZ2 = (d_xhat - d_xhat.mean(-1, keepdim=True)) * r - (d_std * r * (1.0 / d)) * xh
            a_all[i], terms[i] = a, resid + lw * xh
            # Z2 = X̃2 W̃2, X2 = gelu(Z1), [Z1; Z1q] = [K̃; Q̃] W̃1
            dW2 = torch.baddbmm(dW2, x2a.transpose(-1, -2), dZ2)
            dX2a = torch.baddbmm(dX2a, dZ2, w2.transpose(-1, -2))
            dZ1 = dZ1 + dX2a[..., :h] * gp
            dzz = torch.cat([dZ1, dZ1bar], dim=1)
            torch.bmm(dzz, w1.transpose(-1, -2), out=d_kq[i])
            A1 = torch.baddbmm(A1, kq3[i].transpose(-1, -2), dzz)
            A2 = dW2
        a_all, terms = torch.stack(a_all), torch.stack(terms)
        d_tgt = -lw * a_all
        d_lw = (a_all * terms).view(N, B, H, b, d).sum((0, 1, 3)).view(H, 1, d)
        d_lb = (lw * a_all).view(N, B, H, b, d).sum((0, 1, 3)).view(H, 1, d)
        shape = (N, B, H)
        return (A1.view(B, H, d1, h), A2.view(B, H, h + 1, d), d_kq.view(*shape, 2 * b, d1),
                d_tgt.view(*shape, b, d), d_eta.view(*shape, b, b), d_mix.view(*shape, b, b),
                d_down.view(*shape, d1, b), d_slr.view(*shape, b, 1), d_lw, d_lb, None)


@torch.compiler.disable  # a Python loop over mini-batches: torch.compile runs it eagerly
def mlp_scan(W1, W2, kq, tgt, eta, mix1, down1, s_lr, ln_w, ln_b, eps: float = 1e-6):
    """:class:`MLPScan` (Z̄ of every mini-batch and the final weights of both layers)."""
    return MLPScan.apply(W1, W2, kq, tgt, eta, mix1, down1, s_lr, ln_w, ln_b, eps)
