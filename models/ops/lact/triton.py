"""Triton kernels for the LaCT apply-then-gradient step, forward and backward.

**LaCT** (``ops/lact/chunk.lact_scan_chunked``, per chunk piece of n tokens, any n): with
a = X W0, z = X W2 (SiLU, σ elementwise, s' = σ(1 + a(1 − σ)) the derivative of SiLU),

    o = (SiLU(a_q) ⊙ z_q) W1                                      (the apply, X = Q)
    e = V W1ᵀ,  G0 = −(η0 ⊙ K)ᵀ (e ⊙ z ⊙ s'(a)),  G2 = −(η2 ⊙ K)ᵀ (e ⊙ SiLU(a)),
    G1 = −(η1 ⊙ SiLU(a) ⊙ z)ᵀ V                                   (X = K: the η-weighted gradient sums)

Nothing is sequential inside a piece, so the kernels tile: the apply over token blocks (each loops
over the hidden d_h in blocks), the gradient sums over d_h blocks (each loops over the tokens); the
backward likewise in two kernels (weight gradients per d_h block, token gradients per token block; both
recompute the per-token products), so no partial sums are written and the results are deterministic. The momentum, Newton–Schulz and
the weight norm stay in PyTorch (``ops/lact/chunk.lact_commit``: dense d×d_h matmuls once per chunk).

Selected on CUDA tensors by :func:`use_triton_lact`; everywhere else (and
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

from ...common.triton_utils import _cdiv, _device_gives, _flag, _p2


# The kernels module imports triton, so it is imported only when a kernel runs (without triton the
# PyTorch path is used). In an exported folder the kernels file sits beside this one: transformers copies
# it into its remote-code cache because ``_kernels`` imports it as ``from .triton_kernels import …``.
AVAILABLE = importlib.util.find_spec("triton") is not None


def _kernels():
    """The kernels module, imported on first use (it imports triton)."""
    from .triton_kernels import __name__ as name

    return sys.modules[name]


LACT_AUTO_MAX_DIM = 128
LACT_SHARED = ((64, 112 * 1024), (128, 88 * 1024), (256, 168 * 1024))  # (padded d ≤, shared bytes)


def lact_meta(n: int, d: int, dh: int, backward: bool, block_t: int | None = None,
              block_j: int | None = None) -> dict:
    """Tile sizes and launch options of the LaCT kernels: token block BT and d_h block BJ of 32 (16 for
    d > 64); the backward kernels with 8 warps (sm_90 static compile: 255 registers, not 32 + spills)."""
    D = _p2(d)
    size = 32 if D <= 64 else 16
    return dict(BT=block_t or min(size, _p2(n)), D=D, BJ=block_j or min(size, _p2(dh)),
                num_warps=8 if backward else 4, num_stages=1 if backward else 2)


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
