"""The Titans memory's chunked scan (frozen gradients inside a chunk, the dual form; the equations:
``layers/titans.py``) and the closed-form gate products. Only torch is imported.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...common.backprop import backprop_at
from ...common.parts import gelu_tanh
from ...common.scan import linear_scan
from .fused import chunk_scan
from .triton import triton_titans_scan, use_triton_titans


# ------------------------------------------------------------------------------ coefficients


def _scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """linear_scan over the last dim for [..., ch, n] tensors with any leading dims."""
    lead = tokens.shape[:-2]
    g = gates.expand_as(tokens).reshape(-1, *tokens.shape[-2:])
    return linear_scan(g.contiguous(), tokens.reshape(-1, *tokens.shape[-2:]).contiguous()).reshape(*lead, *tokens.shape[-2:])


class _DecayProducts(torch.autograd.Function):
    """G[t, j] = Π_{j<i≤t} g_i (t ≥ j; 1 on the diagonal), 0 above it: gates [..., n] → [..., n, n], one
    cumulative product down each column. Backward without division (g may be 0): as
    ∂G[t, j]/∂g_i = G[t, i] G[i−1, j] for j < i ≤ t,  ∂L/∂g_i = Σ_t G[t, i] (Ḡ G₋ᵀ)[t, i] with G₋[i] = G[i−1]."""

    @staticmethod
    def forward(ctx, gates):
        n = gates.shape[-1]
        below = torch.ones(n, n, dtype=torch.bool, device=gates.device).tril(-1)
        G = torch.where(below, gates[..., :, None], torch.ones((), dtype=gates.dtype, device=gates.device))
        G = G.cumprod(-2).tril_()
        ctx.save_for_backward(G)
        return G

    @staticmethod
    def backward(ctx, grad):
        (G,) = ctx.saved_tensors
        shifted = F.pad(G[..., :-1, :], (0, 0, 1, 0))  # row i = G[i − 1], row 0 = 0
        return (G * (grad @ shifted.transpose(-1, -2))).sum(-2)


def decay_products(gates: torch.Tensor) -> torch.Tensor:
    """G[t, j] = Π_{j<i≤t} g_i for t ≥ j (1 on the diagonal), 0 above it: gates [..., n] → [..., n, n]."""
    with torch.autocast(gates.device.type, enabled=False):
        return _DecayProducts.apply(gates)


def titans_coefficients(lr, eta, alpha):
    """Coefficients of one segment of n tokens (all inputs [..., n]); see the module docstring.
    Closed form of the impulse scans (:func:`titans_coefficients_scan`): with E = decay_products(η),
    A = decay_products(1 − α) and s_tj = −θ_j E_tj, m_t = η_0 E_t0,

        c = A s = (A E) diag(−θ),   f = A m = η_0 (A E)_{·0},   β_t = (1 − α_0) A_t0.

    Returns c [..., n, n] (row t, column j), s_last [..., n] (= s_{n−1, j}), beta, f, m [..., n].
    """
    keep = 1 - alpha
    E, A = decay_products(torch.stack([eta, keep])).unbind(0)
    with torch.autocast(lr.device.type, enabled=False):  # in the gates' dtype, as the scans (elementwise) were
        AE = A @ E
    eta0 = eta[..., :1]
    return AE * -lr[..., None, :], E[..., -1, :] * -lr, keep[..., :1] * A[..., 0], eta0 * AE[..., 0], eta0 * E[..., 0]


def titans_coefficients_scan(lr, eta, alpha):
    """:func:`titans_coefficients` as the two first-order scans run on unit impulses (the reference):
    s_·j = scan(η, −θ_j e_j), c_·j = scan(1 − α, s_·j), m = scan(η, η₀e₀), f = scan(1 − α, m),
    β = scan(1 − α, (1 − α₀)e₀)."""
    n = lr.shape[-1]
    eye = torch.eye(n, dtype=lr.dtype, device=lr.device)
    keep = 1 - alpha
    # channels of the momentum scan: u_0..u_{n−1} (impulse −θ_j at t = j), then S_{t'} (η₀ at t = 0)
    s0_tokens = eta[..., :1] * eye[0]
    mom_tokens = torch.cat([-(lr[..., None, :] * eye), s0_tokens[..., None, :]], -2)  # [..., n+1, n]: channel j, time t
    mom = _scan(eta[..., None, :], mom_tokens)
    m0_tokens = (keep[..., :1] * eye[0])[..., None, :]  # (1 − α₀) at t = 0
    dec = _scan(keep[..., None, :], torch.cat([mom, m0_tokens], -2))  # [..., n+2, n]
    c = dec[..., :n, :].transpose(-1, -2)  # [t, j]
    return c, mom[..., :n, -1], dec[..., n + 1, :], dec[..., n, :], mom[..., n, :]


def _segment(cur: list, anchor: list, mom: list | None, q, k, v, coeffs, max_norm=None):
    """n tokens inside one chunk, from current weights ``cur`` (and momentum ``mom``) with
    gradients at ``anchor``. Returns (o [.., n, d], weights after, momentum after)."""
    xs, ds = backprop_at(anchor, k, v, max_norm)
    c, s_last, beta, f, m = coeffs
    h, L = q, len(cur)
    for i in range(L):
        z = beta[..., None] * (h @ cur[i]) + (c * (h @ xs[i].transpose(-1, -2))) @ ds[i]
        if mom is not None:
            z = z + f[..., None] * (h @ mom[i])
        h = gelu_tanh(z) if i < L - 1 else z
    c_last = c[..., -1, :, None]
    new_w = [beta[..., -1:, None] * W + (c_last * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
    new_m = None
    if mom is not None:
        new_w = [W + f[..., -1:, None] * S for W, S in zip(new_w, mom)]
        new_m = [m[..., -1:, None] * S + (s_last[..., :, None] * X).transpose(-1, -2) @ D for S, X, D in zip(mom, xs, ds)]
    return h, new_w, new_m


def _whole_chunks(cur: list, mom: list | None, q, k, v, coeffs, max_norm=None):
    """N whole chunks (q, k, v [N, B, H, b, d], coefficients [N, B, H, ...]), each as :func:`_segment`
    with the anchor at its starting memory, through ``ops.titans.fused.chunk_scan``; layer 0's C ⊙ QKᵀ does
    not depend on the memory and is formed for all chunks at once. Returns (o [B, H, N·b, d], weights,
    momentum)."""
    c, s_last, beta, f, m = coeffs
    N, B, H, b = q.shape[:4]

    def per_head(t):  # [N, B, H, ...] → [N, B·H, ...]
        return None if t is None else t.to(dtype).reshape(N, B * H, *t.shape[3:])

    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (q, k, v, c, *cur)])
    q, k, v = (t.to(dtype) for t in (q, k, v))  # one dtype (autocast may have left q in bf16, as TNT's q̃)
    with torch.autocast(q.device.type, enabled=False):  # the fused scan computes in that dtype
        qk_mix = c * (q @ k.transpose(-1, -2))
    col = (lambda t: None if mom is None else t[..., None])
    last = (lambda t: None if mom is None else t[..., -1:, None])
    o, *states = chunk_scan(max_norm or None, *(per_head(t) for t in (
        q, k, v, qk_mix, c, beta[..., None], col(f), c[..., -1, :, None], col(s_last), beta[..., -1:, None],
        last(f), last(m))), *(w.to(dtype).reshape(B * H, *w.shape[2:]) for w in cur + (mom or [])))
    o = o.view(N, B, H, b, -1).movedim(0, 2).flatten(2, 3)
    states = [w.view(B, H, *w.shape[1:]) for w in states]
    L = len(cur)
    return o, states[:L], (states[L:] if mom is not None else None)


def titans_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, q, k, v, lr, eta, alpha,
                        position: int, chunk_size: int, max_grad_norm: float | None = None):
    """Chunked Titans memory. q, k, v: [B, H, T, d]; lr, eta, alpha: [B, H, T]; weights/anchor/
    momentum: {W1..WL}: [B, H, d_in, d_out] (momentum None = plain GD with decay). Returns
    (o [B, H, T, d], weights, anchor-or-None, momentum-or-None)."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = cur if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    b, T = chunk_size, q.shape[2]
    head = min(T, (b - position % b) % b)
    n_full = (T - head) // b
    outs = []

    def piece(start, stop):  # a head that finishes a chunk begun earlier, or a tail that starts one
        nonlocal cur, anc, mom
        sl = slice(start, stop)
        coeffs = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        o, cur, mom = _segment(cur, anc, mom, q[:, :, sl], k[:, :, sl], v[:, :, sl], coeffs, max_grad_norm)
        if (position + stop) % b == 0:
            anc = cur
        outs.append(o)

    if head:
        piece(0, head)
    if n_full:  # what does not depend on the memory is computed for all chunks at once
        sl = slice(head, head + n_full * b)

        def blocks(x):
            return x[:, :, sl].unflatten(2, (n_full, b)).movedim(2, 0)  # [N, B, H, b, ...]

        coeffs = titans_coefficients(blocks(lr), blocks(eta), blocks(alpha))
        if use_triton_titans(q, cur, b):  # on CUDA: the Triton chunk kernels (models/triton_memory.py)
            o, cur, mom = triton_titans_scan(cur, mom, blocks(q), blocks(k), blocks(v), *coeffs, max_grad_norm)
            o = o.movedim(0, 2).flatten(2, 3).to(q.dtype)
        else:
            o, cur, mom = _whole_chunks(cur, mom, blocks(q), blocks(k), blocks(v), coeffs, max_grad_norm)
        outs.append(o)
        anc = cur
    if head + n_full * b < T:
        piece(head + n_full * b, T)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    at_boundary = (position + T) % b == 0
    return (o, dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))
