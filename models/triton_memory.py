"""Triton kernels for the Titans chunk scan and the LaCT apply-then-gradient step, forward and backward.

**Titans** (``titans.titans_scan_chunked``, the N full chunks of a call). One program per (batch, head)
keeps the memory M = {W_l} and the momentum S = {S_l} (fp32) on chip and walks the chunks; per chunk
of b tokens (inputs fp32 or bf16, math fp32), with the coefficients c [b, b], s_b, β, f, m of
``titans.titans_coefficients`` (computed in PyTorch, memory-independent):

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

**LaCT** (``lact.lact_scan_chunked``, per chunk piece of n tokens, any n): with
a = X W0, z = X W2 (SiLU, σ elementwise, s' = σ(1 + a(1 − σ)) the derivative of SiLU),

    o = (SiLU(a_q) ⊙ z_q) W1                                      (the apply, X = Q)
    e = V W1ᵀ,  G0 = −(η0 ⊙ K)ᵀ (e ⊙ z ⊙ s'(a)),  G2 = −(η2 ⊙ K)ᵀ (e ⊙ SiLU(a)),
    G1 = −(η1 ⊙ SiLU(a) ⊙ z)ᵀ V                                   (X = K: the η-weighted gradient sums)

Nothing is sequential inside a piece, so the kernels tile: the apply over token blocks (each loops
over the hidden d_h in blocks), the gradient sums over d_h blocks (each loops over the tokens); the
backward likewise in two kernels (weight gradients per d_h block, token gradients per token block; both
recompute the per-token products), so no partial sums are written and the results are deterministic. The momentum, Newton–Schulz and
the weight norm stay in PyTorch (``lact.lact_commit``: dense d×d_h matmuls once per chunk).

Selected on CUDA tensors by :func:`use_triton_titans` / :func:`use_triton_lact`; everywhere else (and
for the shapes they decline) the PyTorch path runs. Sizes are padded to powers of two ≥ 16 inside the
kernels, so any chunk length and head dim run. The kernels run on CPU under ``TRITON_INTERPRET=1``
(tests/models/test_triton_memory.py). Importable without triton (``AVAILABLE`` is then False); the
kernels live in triton_memory_kernels.py, imported on first use. Only torch is imported here: this
file is copied into HF folders.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

AVAILABLE = (importlib.util.find_spec("triton") is not None
             and os.path.exists(os.path.join(os.path.dirname(__file__), "triton_memory_kernels.py")))


def _kernels():
    """The kernels module, imported on first use (it imports triton). The import is written out as
    ``from .triton_memory_kernels import …`` because transformers copies into its remote-code module cache only
    the sibling files imported that way: an exported folder's model finds its kernels."""
    from .triton_memory_kernels import __name__ as name

    return sys.modules[name]


def _p2(n: int) -> int:
    """The kernels' tile size for n: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flag() -> str:
    return os.environ.get("MEMTRAIN_TRITON", "")


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
LACT_AUTO_MAX_DIM = 128
LACT_SHARED = ((64, 112 * 1024), (128, 88 * 1024), (256, 168 * 1024))  # (padded d ≤, shared bytes)


def _device_gives(x: torch.Tensor, table, size: int) -> bool:
    """A CUDA block on x's device has the shared memory the first bound ≥ size needs (none: no)."""
    need = next((b for bound, b in table if size <= bound), None)
    return need is not None and torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin >= need


def titans_meta(chunk: int, dk: int, dh: int, dv: int) -> dict:
    """Tile sizes and launch options of the Titans kernels. One stage: the chunks are a dependent chain
    (nothing to prefetch-pipeline), and it halves the shared memory (280 → 131 KB at d = b = 64, sm_90);
    8 warps: the backward compiles in 74 s instead of 275 s there (142 s instead of > 420 s at 32×64)."""
    return dict(BLK=_p2(chunk), DK=_p2(dk), DH=_p2(dh), DV=_p2(dv), num_warps=8, num_stages=1)


def lact_meta(n: int, d: int, dh: int, backward: bool, block_t: int | None = None,
              block_j: int | None = None) -> dict:
    """Tile sizes and launch options of the LaCT kernels: token block BT and d_h block BJ of 32 (16 for
    d > 64); the backward kernels with 8 warps (sm_90 static compile: 255 registers, not 32 + spills)."""
    D = _p2(d)
    size = 32 if D <= 64 else 16
    return dict(BT=block_t or min(size, _p2(n)), D=D, BJ=block_j or min(size, _p2(dh)),
                num_warps=8 if backward else 4, num_stages=1 if backward else 2)


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


def use_triton_lact(x: torch.Tensor, weights: dict) -> bool:
    """The LaCT kernels: W0, W2 [B, H, d, d_h], W1 [B, H, d_h, d], not float64, triton installed. On CUDA:
    padded d ≤ LACT_AUTO_MAX_DIM (≤ 256 with MEMTRAIN_TRITON=1) and the device's shared memory enough
    (LACT_SHARED). Elsewhere only with MEMTRAIN_TRITON=1; never with MEMTRAIN_TRITON=0."""
    flag = _flag()
    if not AVAILABLE or flag == "0" or x.dtype == torch.float64:
        return False
    if any(w.dtype == torch.float64 or w.dim() != 4 for w in weights.values()):
        return False
    if not x.is_cuda:
        return flag == "1"
    D = _p2(x.shape[-1])
    return _device_gives(x, LACT_SHARED, D) and (D <= LACT_AUTO_MAX_DIM or flag == "1")


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


# --------------------------------------------------------------------------------------- LaCT


class TritonLaCTChunk(torch.autograd.Function):
    """One LaCT chunk piece: W0, W2 [B,H,d,dh], W1 [B,H,dh,d]; q, k, v [B,H,n,d]; lr0, lr1, lr2 [B,H,n]
    → (o [B,H,n,d], G0, G1, G2 like W0, W1, W2), all fp32."""

    @staticmethod
    def forward(ctx, block_t, block_j, W0, W1, W2, q, k, v, lr0, lr1, lr2):
        B, H, n, d = q.shape
        BH, dh = B * H, W0.shape[-1]
        ws = [w.float().contiguous() for w in (W0, W1, W2)]
        xs = [t.contiguous() for t in (q, k, v, lr0, lr1, lr2)]
        fwd = lact_meta(n, d, dh, False, block_t, block_j)
        f32 = dict(device=q.device, dtype=torch.float32)
        out = torch.empty(B, H, n, d, **f32)
        G = [torch.empty(w.shape, **f32) for w in ws]
        K = _kernels()
        K._lact_apply[(BH, _cdiv(n, fwd["BT"]))](*ws, xs[0], out, n, d, dh, **fwd)
        K._lact_grads[(BH, _cdiv(dh, fwd["BJ"]))](*ws, *xs[1:], *G, n, d, dh, **fwd)
        ctx.save_for_backward(*ws, *xs)
        dtypes = [t.dtype for t in (W0, W1, W2, q, k, v, lr0, lr1, lr2)]
        ctx.cfg = (lact_meta(n, d, dh, True, block_t, block_j), dtypes)
        return out, *G

    @staticmethod
    def backward(ctx, d_out, *d_G):
        bwd, dtypes = ctx.cfg
        W0, W1, W2, q, k, v, lr0, lr1, lr2 = ctx.saved_tensors
        B, H, n, d = q.shape
        BH, dh = B * H, W0.shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        d_out = torch.zeros(B, H, n, d, **f32) if d_out is None else d_out.float().contiguous()
        d_G = [torch.zeros(w.shape, **f32) if g is None else g.float().contiguous() for g, w in zip(d_G, (W0, W1, W2))]
        dW = [torch.empty(w.shape, **f32) for w in (W0, W1, W2)]
        dx = [torch.empty(t.shape, **f32) for t in (q, k, v, lr0, lr1, lr2)]
        K = _kernels()
        args = (W0, W1, W2, q, k, v, lr0, lr1, lr2, d_out, *d_G)
        K._lact_bwd_w[(BH, _cdiv(dh, bwd["BJ"]))](*args, *dW, n, d, dh, **bwd)
        K._lact_bwd_x[(BH, _cdiv(n, bwd["BT"]))](*args, *dx, n, d, dh, **bwd)
        return (None, None, *[g.to(dt) for g, dt in zip(dW + dx, dtypes)])


@torch.compiler.disable  # launches its own kernels
def triton_lact_chunk(weights: dict, q, k, v, lr0, lr1, lr2, block_t: int | None = None,
                      block_j: int | None = None):
    """:class:`TritonLaCTChunk` = (``swiglu_memory(weights, q)``, ``lact_grads(weights, k, v, lr0, lr1, lr2)``)
    in one call: (o [B,H,n,d] fp32, {W0, W1, W2: G}). ``block_t``/``block_j`` override the tile sizes."""
    o, g0, g1, g2 = TritonLaCTChunk.apply(block_t, block_j, weights["W0"], weights["W1"], weights["W2"],
                                          q, k, v, lr0, lr1, lr2)
    return o, {n: g.to(weights[n].dtype) for n, g in zip(("W0", "W1", "W2"), (g0, g1, g2))}
