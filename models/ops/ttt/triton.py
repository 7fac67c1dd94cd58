"""Triton kernels for the chunk step of TTT-Linear and TTT-MLP (dual form), forward and backward.

One program per (batch, head) keeps the fast weights W, b (fp32) on chip and walks the N full
mini-batches of a call; per mini-batch i (b tokens, inputs in fp32 or bf16, math in fp32):

    Z = K W + b,  G = ∇LN-L2(Z, t)                                (the inner gradient at θ_i)
    Z̄ = Q W + b − mix G,   mix = tril(s ηᵀ ⊙ (Q Kᵀ + 1))          (the reads of the dual form)
    W ← W − (s_b η ⊙ K)ᵀ G,   b ← b − Σ_r s_b η_r G_r

TTT-MLP applies the same to both layers (``ops.ttt.fused.MLPScan``'s equations, biases kept apart).
The forward stores G_i of every mini-batch (T·d, as the inputs) and the weights only every
KEEP_EVERY = 16 mini-batches; the backward walks the mini-batches in reverse from the final weights,
recovers W̃_i = W̃_{i+1} + D_i G_i (the update undone, as ``ops.ttt.fused._Anchors``; reloaded where kept),
recomputes Z_i from it and carries ∂L/∂W, ∂L/∂b (the recursion of ``ops.ttt.fused.LinearScan``). ``mix`` and s_b η come from PyTorch (autograd takes their
gradients on). Selected by :func:`use_triton` on CUDA tensors; everywhere else the chunked scan
runs ``ops.ttt.fused.LinearScan`` / ``MLPScan``. The kernels run on CPU under ``TRITON_INTERPRET=1`` (the tests).
Importable without triton (``AVAILABLE`` is then False); the kernels live in triton_kernels.py,
imported on first use. Only torch is imported here: this file is copied into HF folders.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch


# The kernels module imports triton, so it is imported only when a kernel runs (without triton the
# PyTorch path is used). In an exported folder the kernels file sits beside this one: transformers copies
# it into its remote-code cache because ``_kernels`` imports it as ``from .triton_kernels import …``.
AVAILABLE = importlib.util.find_spec("triton") is not None


def _kernels():
    """The kernels module, imported on first use (it imports triton)."""
    from .triton_kernels import __name__ as name

    return sys.modules[name]


# Largest fast-weight tile (elements per weight matrix) selected automatically on CUDA. The kernels
# hold whole weight matrices per program; above this (e.g. TTT-MLP's 64×256 at head dim 64) they are
# untuned and unmeasured on a GPU, so they run only when asked for with MEMTRAIN_TRITON=1.
AUTO_MAX_TILE = 64 * 64


# The forward keeps the fast weights every KEEP_EVERY mini-batches (as ops.ttt.fused._Anchors) and G_i of every
# one; the backward recovers W̃_i = W̃_{i+1} + D_i G_i in between.
KEEP_EVERY = 16


def _kept(N: int) -> int:
    return (N + KEEP_EVERY - 1) // KEEP_EVERY


def ttt_meta(inner: str, b: int, d: int, h: int, backward: bool) -> dict:
    """Tile sizes and launch options of one TTT kernel (also read by bench/triton_sm90.py). 8 warps with
    ``maxnreg=255`` (256 threads × 255 registers fit the register file): left to itself ptxas gave these
    kernels 32 registers and 4–7 KB of spills per thread at head dim 64 (sm_90 compile, docs/benchmarks.md)."""
    meta = dict(BLK=b, D=d, EVERY=KEEP_EVERY) if inner == "linear" else dict(BLK=b, D=d, HD=h, EVERY=KEEP_EVERY)
    return dict(meta, num_warps=8, num_stages=1, maxnreg=255)


def use_triton(x: torch.Tensor, mini_batch: int, head_dim: int, hidden: int | None = None) -> bool:
    """The Triton path: on CUDA when triton is installed and each weight matrix has ≤ AUTO_MAX_TILE
    elements, or anywhere with MEMTRAIN_TRITON=1 (e.g. the interpreter); never with MEMTRAIN_TRITON=0.
    tl.dot needs power-of-two sizes ≥ 16 (``hidden``: TTT-MLP's inner width); the kernels compute in
    fp32, so float64 stays on the PyTorch path."""
    flag = os.environ.get("MEMTRAIN_TRITON", "")
    if not AVAILABLE or flag == "0":
        return False
    hidden = hidden or head_dim
    shapes_ok = all(n >= 16 and n & (n - 1) == 0 for n in (mini_batch, head_dim, hidden))
    auto = x.is_cuda and head_dim * hidden <= AUTO_MAX_TILE
    return shapes_ok and x.dtype != torch.float64 and (auto or flag == "1")


class TritonLinearScan(torch.autograd.Function):
    """N full mini-batches of TTT-Linear: W̃ = [W; b]: [B,H,d+1,d] (fp32), q, k, tgt: [N,B,H,b,d],
    mix: [N,B,H,b,b], slr = s_b η: [N,B,H,b], ln_w, ln_b: [H,1,d] → (Z̄ [N,B,H,b,d] fp32, W̃_N)."""

    @staticmethod
    def forward(ctx, W, q, k, tgt, mix, slr, ln_w, ln_b, eps=1e-6):
        N, B, H, b, d = q.shape
        BH = B * H
        w0 = W[..., :d, :].float().contiguous()
        b0 = W[..., d, :].float().contiguous()
        q, k, tgt, mix, slr = (t.contiguous() for t in (q, k, tgt, mix, slr))
        lnw = ln_w.float().expand(B, H, 1, d).contiguous()
        lnb = ln_b.float().expand(B, H, 1, d).contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        out, gs = torch.empty(N, B, H, b, d, **f32), torch.empty(N, BH, b, d, **f32)
        ws, bs = torch.empty(_kept(N), BH, d, d, **f32), torch.empty(_kept(N), BH, d, **f32)
        wn, bn = torch.empty(BH, d, d, **f32), torch.empty(BH, d, **f32)
        _kernels()._ttt_linear_fwd[(BH,)](w0, b0, q, k, tgt, mix, slr, lnw, lnb, out, gs, ws, bs, wn, bn, N, BH, eps,
                                          **ttt_meta("linear", b, d, d, False))
        ctx.save_for_backward(gs, ws, bs, wn, bn, q, k, tgt, mix, slr, lnw, lnb)
        ctx.eps, ctx.dtypes = eps, (W.dtype, q.dtype, mix.dtype, slr.dtype, ln_w.dtype)
        return out, torch.cat([wn, bn[:, None]], dim=1).view(B, H, d + 1, d).to(W.dtype)

    @staticmethod
    def backward(ctx, d_out, d_W):
        gs, ws, bs, wn, bn, q, k, tgt, mix, slr, lnw, lnb = ctx.saved_tensors
        N, B, H, b, d = q.shape
        BH = B * H
        f32 = dict(device=q.device, dtype=torch.float32)
        d_out = torch.zeros(N, B, H, b, d, **f32) if d_out is None else d_out.float().contiguous()
        d_W = torch.zeros(B, H, d + 1, d, **f32) if d_W is None else d_W.float()
        dwn, dbn = d_W[..., :d, :].contiguous(), d_W[..., d, :].contiguous()
        dw0, db0 = torch.empty(BH, d, d, **f32), torch.empty(BH, d, **f32)
        dq, dk, dtgt = (torch.empty(N, B, H, b, d, **f32) for _ in range(3))
        dmix, dslr = torch.empty(N, B, H, b, b, **f32), torch.empty(N, B, H, b, **f32)
        dlnw, dlnb = torch.empty(BH, d, **f32), torch.empty(BH, d, **f32)
        _kernels()._ttt_linear_bwd[(BH,)](gs, ws, bs, wn, bn, q, k, tgt, mix, slr, lnw, lnb, d_out, dwn, dbn,
                               dw0, db0, dq, dk, dtgt, dmix, dslr, dlnw, dlnb, N, BH, ctx.eps,
                                          **ttt_meta("linear", b, d, d, True))
        w_dt, x_dt, mix_dt, slr_dt, ln_dt = ctx.dtypes
        dW = torch.cat([dw0, db0[:, None]], dim=1).view(B, H, d + 1, d).to(w_dt)
        d_ln = [t.view(B, H, 1, d).sum(0).to(ln_dt) for t in (dlnw, dlnb)]
        return (dW, dq.to(x_dt), dk.to(x_dt), dtgt.to(x_dt), dmix.to(mix_dt), dslr.to(slr_dt), *d_ln, None)


@torch.compiler.disable  # launches its own kernels
def triton_linear_scan(W, q, k, tgt, mix, slr, ln_w, ln_b, eps: float = 1e-6):
    """:class:`TritonLinearScan` (Z̄ of every mini-batch and the final folded weights)."""
    return TritonLinearScan.apply(W, q, k, tgt, mix, slr, ln_w, ln_b, eps)


def _fp32_copies(W1, d, W2, h):
    """Fresh contiguous fp32 [B·H, d, h], [B·H, h], [B·H, h, d], [B·H, d] from W̃1 = [W1; b1], W̃2 = [W2; b2]
    (the kernels update them in place, so never views of the caller's tensors)."""
    B, H = W1.shape[:2]
    return [t.to(torch.float32, copy=True).contiguous().view(B * H, *t.shape[2:])
            for t in (W1[..., :d, :], W1[..., d, :], W2[..., :h, :], W2[..., h, :])]


class TritonMLPScan(torch.autograd.Function):
    """N full mini-batches of TTT-MLP (as ``ops.ttt.fused.MLPScan``): W̃1 = [W1; b1]: [B,H,d+1,h],
    W̃2 = [W2; b2]: [B,H,h+1,d] (fp32); q, k, tgt: [N,B,H,b,d]; eta = tril(s ηᵀ), mix1: [N,B,H,b,b];
    slr = s_b η: [N,B,H,b]; ln_w, ln_b: [H,1,d] → (Z̄ [N,B,H,b,d] fp32, W̃1_N, W̃2_N)."""

    @staticmethod
    def forward(ctx, W1, W2, q, k, tgt, eta, mix, slr, ln_w, ln_b, eps=1e-6):
        N, B, H, b, d = q.shape
        BH, h = B * H, W1.shape[-1]
        # the kernel updates these in place: they end as the final weights
        w1n, b1n, w2n, b2n = _fp32_copies(W1, d, W2, h)
        q, k, tgt, eta, mix, slr = (t.contiguous() for t in (q, k, tgt, eta, mix, slr))
        lnw = ln_w.float().expand(B, H, 1, d).contiguous()
        lnb = ln_b.float().expand(B, H, 1, d).contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        out = torch.empty(N, B, H, b, d, **f32)
        g1s, g2s = torch.empty(N, BH, b, h, **f32), torch.empty(N, BH, b, d, **f32)
        w1s, b1s = torch.empty(_kept(N), BH, d, h, **f32), torch.empty(_kept(N), BH, h, **f32)
        w2s, b2s = torch.empty(_kept(N), BH, h, d, **f32), torch.empty(_kept(N), BH, d, **f32)
        _kernels()._ttt_mlp_fwd[(BH,)](q, k, tgt, eta, mix, slr, lnw, lnb, out, g1s, g2s, w1s, b1s, w2s, b2s,
                                       w1n, b1n, w2n, b2n, N, BH, eps, **ttt_meta("mlp", b, d, h, False))
        ctx.save_for_backward(g1s, g2s, w1s, b1s, w2s, b2s, w1n, b1n, w2n, b2n, q, k, tgt, eta, mix, slr, lnw, lnb)
        ctx.eps, ctx.dtypes = eps, (W1.dtype, q.dtype, eta.dtype, mix.dtype, slr.dtype, ln_w.dtype)
        W1n = torch.cat([w1n, b1n[:, None]], dim=1).view(B, H, d + 1, h).to(W1.dtype)
        W2n = torch.cat([w2n, b2n[:, None]], dim=1).view(B, H, h + 1, d).to(W2.dtype)
        return out, W1n, W2n

    @staticmethod
    def backward(ctx, d_out, d_W1, d_W2):
        g1s, g2s, w1s, b1s, w2s, b2s, w1n, b1n, w2n, b2n, q, k, tgt, eta, mix, slr, lnw, lnb = ctx.saved_tensors
        N, B, H, b, d = q.shape
        BH, h = B * H, w1s.shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        d_out = torch.zeros(N, B, H, b, d, **f32) if d_out is None else d_out.float().contiguous()
        d_W1 = torch.zeros(B, H, d + 1, h, **f32) if d_W1 is None else d_W1.float()
        d_W2 = torch.zeros(B, H, h + 1, d, **f32) if d_W2 is None else d_W2.float()
        # updated in place by the kernel: ∂L/∂(final weights) → ∂L/∂(initial weights); final → initial weights
        dw10, db10, dw20, db20 = _fp32_copies(d_W1, d, d_W2, h)
        w1r, b1r, w2r, b2r = (t.clone() for t in (w1n, b1n, w2n, b2n))
        dq, dk, dtgt = (torch.empty(N, B, H, b, d, **f32) for _ in range(3))
        deta, dmix = torch.empty(N, B, H, b, b, **f32), torch.empty(N, B, H, b, b, **f32)
        dslr = torch.empty(N, B, H, b, **f32)
        dlnw, dlnb = torch.empty(BH, d, **f32), torch.empty(BH, d, **f32)
        _kernels()._ttt_mlp_bwd[(BH,)](g1s, g2s, w1s, b1s, w2s, b2s, w1r, b1r, w2r, b2r, q, k, tgt, eta, mix, slr, lnw,
                                       lnb, d_out, dw10, db10, dw20, db20, dq, dk, dtgt, deta, dmix, dslr, dlnw,
                                       dlnb, N, BH, ctx.eps, **ttt_meta("mlp", b, d, h, True))
        w_dt, x_dt, eta_dt, mix_dt, slr_dt, ln_dt = ctx.dtypes
        dW1 = torch.cat([dw10, db10[:, None]], dim=1).view(B, H, d + 1, h).to(w_dt)
        dW2 = torch.cat([dw20, db20[:, None]], dim=1).view(B, H, h + 1, d).to(w_dt)
        d_ln = [t.view(B, H, 1, d).sum(0).to(ln_dt) for t in (dlnw, dlnb)]
        return (dW1, dW2, dq.to(x_dt), dk.to(x_dt), dtgt.to(x_dt), deta.to(eta_dt), dmix.to(mix_dt),
                dslr.to(slr_dt), *d_ln, None)


@torch.compiler.disable  # launches its own kernels
def triton_mlp_scan(W1, W2, q, k, tgt, eta, mix1, slr, ln_w, ln_b, eps: float = 1e-6):
    """:class:`TritonMLPScan` (Z̄ of every mini-batch and the final folded weights of both layers)."""
    return TritonMLPScan.apply(W1, W2, q, k, tgt, eta, mix1, slr, ln_w, ln_b, eps)
