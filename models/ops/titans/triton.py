"""Triton kernels for the Titans chunk scan, forward and backward.

**Titans** (``ops/titans/chunk.titans_scan_chunked``, the N full chunks of a call). One program per (batch, head)
keeps the memory M = {W_l} and the momentum S = {S_l} (fp32) on chip and walks the chunks; per chunk
of b tokens (inputs fp32 or bf16, math fp32), with the coefficients c [b, b], s_b, β, f, m of
``ops/titans/chunk.titans_coefficients`` (computed in PyTorch, memory-independent):

    X_1 = K, Z_1 = K W_1, X_2 = gelu(Z_1), E = X_2 W_2 − V        (depth 1: E = K W_1 − V)
    Δ_2 = E, Δ_1 = (E W_2ᵀ) ⊙ gelu'(Z_1)                          (the inner gradient at the chunk's start)
    Δ_l ← φ(‖X_l‖‖Δ_l‖) Δ_l,  φ(n) = τ tanh(n/τ)/n                (``max_grad_norm`` τ, per token)
    Z̄_l = β ⊙ H_l W_l + (C ⊙ H_l X_lᵀ) Δ_l + f ⊙ H_l S_l,  H_1 = Q, H_2 = gelu(Z̄_1),  o = Z̄_L
    W_l ← β_b W_l + (c_b ⊙ X_l)ᵀ Δ_l + f_b S_l,   S_l ← m_b S_l + (s_b ⊙ X_l)ᵀ Δ_l

(c_b the last row of C; "sgd", momentum None: no S, f, m, s). Depth 1 (a dk×dv matrix) and depth 2
(dk×dh, dh×dv, GELU between) run in the kernel; deeper memories stay on the PyTorch loop. The forward
stores W_l, S_l once per chunk (N·|M|, not T·|M|); the backward walks the chunks in reverse,
recomputes each from its stored weights and carries ∂L/∂W_l, ∂L/∂S_l, returning the gradients of q,
k, v, of every coefficient (autograd takes them on to θ, η, α) and of the initial W, S. TNT and Hope,
which call ``titans_scan_chunked``, take the kernel for their full chunks too.

Selected on CUDA tensors by :func:`use_triton_titans`; everywhere else (and
for the shapes they decline) the PyTorch path runs. Sizes are padded to powers of two ≥ 16 inside the
kernels, so any chunk length and head dim run. The kernels run on CPU under ``TRITON_INTERPRET=1``
(tests/models/test_triton_memory.py). Importable without triton (``AVAILABLE`` is then False); the
kernels live in triton_kernels.py, imported on first use. Only torch is imported here: this
file is copied into HF folders.
"""
from __future__ import annotations

import importlib.util
import sys

import torch

from ...common.triton_utils import _device_gives, _flag, _p2


# The kernels module imports triton, so it is imported only when a kernel runs (without triton the
# PyTorch path is used). In an exported folder the kernels file sits beside this one: transformers copies
# it into its remote-code cache because ``_kernels`` imports it as ``from .triton_kernels import …``.
AVAILABLE = importlib.util.find_spec("triton") is not None


def _kernels():
    """The kernels module, imported on first use (it imports triton)."""
    from .triton_kernels import __name__ as name

    return sys.modules[name]


# Selection on CUDA. The Titans kernel holds the whole memory, its momentum and (backward) their
# adjoints per program: automatic while the padded memory has ≤ 64×64 elements in all (depth 1 up to
# head dim 64, depth 2 up to 32×64 + 64×32) and chunks ≤ 64; up to 2·64×64 with MEMTRAIN_TRITON=1.
# Beyond that — e.g. the default depth 2, expansion 2 at head dim 64 (64×128 + 128×64) — the backward
# needs 304 KB of shared memory compiled for sm_90 (an H200 block has 227 KB), so CUDA keeps PyTorch.
# LaCT: automatic for padded fast head dims ≤ 128, up to 256 with MEMTRAIN_TRITON=1. Each bound also
# needs the device to give a block the shared memory the sm_90 compile took (bench/triton_sm90.py, at
# the bound, the backward kernels); on CPU tensors (the interpreter) MEMTRAIN_TRITON=1 runs any shape.
TITANS_AUTO_MAX_MEMORY = 64 * 64
TITANS_MAX_CHUNK = 64
TITANS_SHARED = ((64 * 64, 144 * 1024), (2 * 64 * 64, 208 * 1024))  # (padded memory ≤, shared bytes)


def titans_meta(chunk: int, dk: int, dh: int, dv: int) -> dict:
    """Tile sizes and launch options of the Titans kernels. One stage: the chunks are a dependent chain
    (nothing to prefetch-pipeline), and it halves the shared memory (280 → 131 KB at d = b = 64, sm_90);
    8 warps: the backward compiles in 74 s instead of 275 s there (142 s instead of > 420 s at 32×64)."""
    return dict(BLK=_p2(chunk), DK=_p2(dk), DH=_p2(dh), DV=_p2(dv), num_warps=8, num_stages=1)


def use_triton_titans(x: torch.Tensor, weights: list, chunk_size: int) -> bool:
    """The Titans kernel: depth 1 or 2 (weights [B, H, d_in, d_out]), not float64, triton installed. On
    CUDA: chunk ≤ TITANS_MAX_CHUNK, padded memory ≤ TITANS_AUTO_MAX_MEMORY elements (2× that with
    MEMTRAIN_TRITON=1) and the device's shared memory enough (TITANS_SHARED). Elsewhere only with
    MEMTRAIN_TRITON=1 (the interpreter: any shape); never with MEMTRAIN_TRITON=0."""
    flag = _flag()
    if not AVAILABLE or flag == "0" or len(weights) not in (1, 2):
        return False
    if any(t.dtype == torch.float64 for t in (x, *weights)) or any(w.dim() != 4 for w in weights):
        return False
    if not x.is_cuda:
        return flag == "1"
    size = sum(_p2(w.shape[-2]) * _p2(w.shape[-1]) for w in weights)
    if _p2(chunk_size) > TITANS_MAX_CHUNK or not _device_gives(x, TITANS_SHARED, size):
        return False
    return size <= TITANS_AUTO_MAX_MEMORY or flag == "1"


# ------------------------------------------------------------------------------------- Titans


class TritonTitansScan(torch.autograd.Function):
    """N full Titans chunks. q, k: [N,B,H,b,dk], v: [N,B,H,b,dv]; c: [N,B,H,b,b]; s_last, beta, f, m:
    [N,B,H,b]; weights: W1 [B,H,dk,dh] (, W2 [B,H,dh,dv]) then, with momentum, S1 (, S2) → (o
    [N,B,H,b,dv] fp32, the weights and momenta after the last chunk)."""

    @staticmethod
    def forward(ctx, tau, depth, mom, q, k, v, c, s_last, beta, f, m, *state):
        N, B, H, b, dk = q.shape
        dv, BH = v.shape[-1], B * H
        dh = state[0].shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        q, k, v, c, s_last, beta, f, m = (t.contiguous() for t in (q, k, v, c, s_last, beta, f, m))
        w = [t.float().contiguous() for t in state]
        shapes = [(dk, dh), (dh, dv)][:depth]
        ws, wn = w[:depth], [torch.empty(BH, *s, **f32) for s in shapes]
        ss, sn = (w[depth:], [torch.empty(BH, *s, **f32) for s in shapes]) if mom else ([], [])
        saved_w = [torch.empty(N, BH, *s, **f32) for s in shapes]
        saved_s = [torch.empty(N, BH, *s, **f32) for s in shapes] if mom else []

        def four(lst):  # W1, W2 (or S1, S2) slots of the kernel; unused slots get a dummy
            return (lst + [q] * 2)[:2]

        out = torch.empty(N, B, H, b, dv, **f32)
        _kernels()._titans_fwd[(BH,)](*four(ws), *four(ss), q, k, v, c, s_last, beta, f, m, out,
                                      *four(saved_w), *four(saved_s), *four(wn), *four(sn),
                                      N, BH, b, dk, dh, dv, float(tau or 1.0), **titans_meta(b, dk, dh, dv),
                                      DEPTH=depth, MOM=mom, CLAMP=bool(tau))
        ctx.save_for_backward(q, k, v, c, s_last, beta, f, m, *saved_w, *saved_s)
        ctx.cfg = (tau, depth, mom, [t.dtype for t in (q, k, v, c, s_last, beta, f, m)], [t.dtype for t in state])
        return (out, *[t.view(B, H, *t.shape[1:]).to(x.dtype) for t, x in zip(wn + sn, state)])

    @staticmethod
    def backward(ctx, d_out, *d_state):
        tau, depth, mom, in_dtypes, st_dtypes = ctx.cfg
        q, k, v, c, s_last, beta, f, m, *saved = ctx.saved_tensors
        N, B, H, b, dk = q.shape
        dv, BH = v.shape[-1], B * H
        dh = saved[0].shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        shapes = [(dk, dh), (dh, dv)][:depth] * (2 if mom else 1)
        d_out = torch.zeros(N, B, H, b, dv, **f32) if d_out is None else d_out.float().contiguous()
        d_state = [torch.zeros(BH, *s, **f32) if g is None else g.float().reshape(BH, *s).contiguous()
                   for g, s in zip(d_state, shapes)]
        d_init = [torch.empty(BH, *s, **f32) for s in shapes]
        grads = [torch.empty(t.shape, **f32) for t in (q, k, v, c, s_last, beta, f, m)]
        saved_w, saved_s = saved[:depth], saved[depth:]

        def four(lst):
            return (list(lst) + [q] * 2)[:2]

        _kernels()._titans_bwd[(BH,)](*four(saved_w), *four(saved_s), q, k, v, c, s_last, beta, f, m, d_out,
                                      *four(d_state[:depth]), *four(d_state[depth:]),
                                      *four(d_init[:depth]), *four(d_init[depth:]), *grads,
                                      N, BH, b, dk, dh, dv, float(tau or 1.0), **titans_meta(b, dk, dh, dv),
                                      DEPTH=depth, MOM=mom, CLAMP=bool(tau))
        grads = [g.to(dt) for g, dt in zip(grads, in_dtypes)]
        if not mom:  # s_last, f, m do not enter the scan without momentum
            grads[4] = grads[6] = grads[7] = None
        d_init = [g.view(B, H, *g.shape[1:]).to(dt) for g, dt in zip(d_init, st_dtypes)]
        return (None, None, None, *grads, *d_init)


@torch.compiler.disable  # launches its own kernels
def triton_titans_scan(weights: list, momentum: list | None, q, k, v, c, s_last, beta, f, m,
                       max_grad_norm: float | None = None):
    """:class:`TritonTitansScan`: (o [N,B,H,b,dv] fp32, weights after, momentum after or None)."""
    depth, mom = len(weights), momentum is not None
    res = TritonTitansScan.apply(max_grad_norm or None, depth, mom, q, k, v, c, s_last, beta, f, m,
                                 *weights, *(momentum or []))
    return res[0], list(res[1:1 + depth]), (list(res[1 + depth:]) if mom else None)
