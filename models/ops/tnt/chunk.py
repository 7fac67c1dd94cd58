"""TNT's chunked scan (a global Titans memory, local memories reset periodically, the Q-K projection; the
equations: ``layers/tnt.py``). Only torch is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...common.backprop import backprop_at
from ...common.parts import deep_mlp_memory
from ...common.scan import chunk_sizes, linear_scan, split_chunks
from ...common.state import LayerState
from ..titans.chunk import titans_scan_chunked


# ------------------------------------------------------------------------------ global memory


def _reverse_scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """h_j = gates_j h_{j+1} + tokens_j along the last dim (h_n = 0), for any leading dims."""
    lead, n = tokens.shape[:-1], tokens.shape[-1]
    g = gates.expand_as(tokens).flip(-1).reshape(-1, 1, n)
    return linear_scan(g.contiguous(), tokens.flip(-1).reshape(-1, 1, n).contiguous()).reshape(*lead, n).flip(-1)


def chunk_end_coefficients(lr, eta, alpha):
    """Last row of the Titans chunk coefficients in O(n) (inputs [..., n]): after n tokens from (M, S),

        M_n = β M + f S + Σ_j c_j u_j,    S_n = m S + Σ_j s_j u_j,

    with A_j = Π_{i>j}(1 − α_i), E_j = Π_{i>j} η_i, r_j = A_j + η_{j+1} r_{j+1}:
    β = Π(1 − α), c_j = −θ_j r_j, f = η_0 r_0, s_j = −θ_j E_j, m = η_0 E_0.
    (titans_coefficients gives the same numbers as the last row of an n × n table.)"""
    one = torch.ones_like(lr[..., :1])
    keep = 1 - alpha
    A = torch.cat([keep[..., 1:], one], -1).flip(-1).cumprod(-1).flip(-1)
    E = torch.cat([eta[..., 1:], one], -1).flip(-1).cumprod(-1).flip(-1)
    r = _reverse_scan(torch.cat([eta[..., 1:], torch.zeros_like(one)], -1), A)
    beta = keep[..., 0] * A[..., 0]
    return -lr * r, eta[..., 0] * r[..., 0], beta, -lr * E, eta[..., 0] * E[..., 0]


def advance_chunk(cur: list, anchor: list, mom: list | None, k, v, lr, eta, alpha, max_norm, coeffs=None):
    """(M, S) after n tokens whose gradients are taken at ``anchor``; no per-token read.
    ``coeffs``: chunk_end_coefficients(lr, eta, alpha) when the caller already has them."""
    xs, ds = backprop_at(anchor, k, v, max_norm)
    c, f, beta, s, m = chunk_end_coefficients(lr, eta, alpha) if coeffs is None else coeffs
    new_w = [beta[..., None, None] * W + (c[..., None] * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
    if mom is None:
        return new_w, None
    new_w = [W + f[..., None, None] * S for W, S in zip(new_w, mom)]
    new_m = [m[..., None, None] * S + (s[..., None] * X).transpose(-1, -2) @ D for S, X, D in zip(mom, xs, ds)]
    return new_w, new_m


def global_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, q, k, v, lr, eta, alpha,
                        position: int, chunk_size: int, max_grad_norm: float | None = None):
    """The global memory: o_t = V_{ξ(t)}(q_t), V updated by Titans' rule with gradients at V_{ξ(t)}.
    Shapes as titans_scan_chunked; returns (o, weights, anchor-or-None, momentum-or-None)."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = None if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    T, outs, t = q.shape[2], [], 0
    sizes = chunk_sizes(position, T, chunk_size)
    for size, (qc, kc, vc, lc, ec, ac) in zip(sizes, split_chunks(sizes, q, k, v, lr, eta, alpha)):
        if (position + t) % chunk_size == 0:
            anc = cur
        outs.append(deep_mlp_memory(dict(zip(names, anc)), qc))
        cur, mom = advance_chunk(cur, anc, mom, kc, vc, lc, ec, ac, max_grad_norm)
        t += size
    at_boundary = (position + T) % chunk_size == 0
    return (torch.cat(outs, 2), dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))


# ------------------------------------------------------------------------------ the whole scan


def soft_unit(x: torch.Tensor) -> torch.Tensor:
    """x / √(1 + ‖x‖²): unit length for large x, ≈ x for small x (no amplification near 0)."""
    return x * torch.rsqrt(1 + x.pow(2).sum(-1, keepdim=True))


QK_CHUNK = 64  # the Q-K projection's linear attention runs in chunks of this many tokens


def qk_project(P: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """q̃_t = soft_unit(P_t q_t), P_t = P + Σ_{τ≤t} k_τ k_τᵀ/‖k_τ‖² (one reset segment). Returns (q̃, P_T).

    As chunked linear attention: per chunk c, P q = Q_c P_c + tril(Q_c K_cᵀ) K_c with P_c the sum at the
    chunk's start (so the cost is O(T·d²), not O(T²·d))."""
    kn = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    T, c = q.shape[-2], QK_CHUNK
    if T <= c:
        return soft_unit(q @ P + (q @ kn.transpose(-1, -2)).tril() @ kn), P + kn.transpose(-1, -2) @ kn
    pad = (-T) % c  # zero keys add nothing to P

    def chunks(t):
        return F.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, c))  # [..., n, c, d]

    qc, kc = chunks(q), chunks(kn)
    sums = kc.transpose(-1, -2) @ kc  # [..., n, d, d]
    starts = P.unsqueeze(-3) + sums.cumsum(-3) - sums
    out = qc @ starts + (qc @ kc.transpose(-1, -2)).tril() @ kc
    return soft_unit(out.flatten(-3, -2)[..., :T, :]), P + sums.sum(-3)


def _segments(position: int, T: int, period: int):
    """Cuts [0, T) at absolute multiples of ``period``: (head, n_full, tail) lengths."""
    head = min(T, (period - position % period) % period)
    n_full = (T - head) // period
    return head, n_full, T - head - n_full * period


def tnt_scan_chunked(glob: LayerState, locs: list, P, inits: list, q, k, v, gates: list, position: int,
                     global_chunk: int, local_chunks: list, reset_period: int, max_grad_norm=None):
    """Chunked TNT. glob / locs[m]: LayerState(weights, anchor, opt["momentum"]) of the global and
    the local memories (momentum absent = plain GD); P [B, H, d, d]; inits[m]: the locals' initial
    weights [B, H, ...]; q, k, v [B, H, T, d]; gates[0] (global), gates[1 + m]: (lr, eta, alpha)
    [B, H, T]. Returns (o, glob, locs, P) at position + T."""
    B, H, T, d = q.shape
    mom = glob.opt.get("momentum")
    o, gw, ga, gm = global_scan_chunked(glob.weights, glob.anchor, mom, q, k, v, *gates[0], position,
                                        global_chunk, max_grad_norm)
    glob = LayerState(weights=gw, anchor=ga, opt={} if gm is None else {"momentum": gm})
    locs = list(locs)
    head, n_full, tail = _segments(position, T, reset_period)
    use_mom = mom is not None

    def run(sl, states, P0, pos):  # one piece of a reset segment, every local memory
        qt, Pn = qk_project(P0, q[:, :, sl], k[:, :, sl])
        outs, new = 0, []
        for m, st in enumerate(states):
            lr, eta, alpha = (g[:, :, sl] for g in gates[1 + m])
            y, w, a, mo = titans_scan_chunked(st.weights, st.anchor, st.opt.get("momentum"), qt, k[:, :, sl],
                                              v[:, :, sl], lr, eta, alpha, pos, local_chunks[m], max_grad_norm)
            outs = outs + y
            new.append(LayerState(weights=w, anchor=a, opt={} if mo is None else {"momentum": mo}))
        return outs, new, Pn

    def fresh(batch):
        return [LayerState(weights={n: w.expand(batch, *w.shape[1:]) for n, w in init.items()},
                           opt={"momentum": {n: torch.zeros_like(w).expand(batch, *w.shape[1:])
                                             for n, w in init.items()}} if use_mom else {})
                for init in inits]

    pieces = []
    if head:
        y, locs, P = run(slice(0, head), locs, P, position)
        pieces.append(y)
    if n_full:  # complete segments are independent: all at once, segments folded into the batch
        S = reset_period
        sl = slice(head, head + n_full * S)

        def fold(t):  # [B, H, n·S, ...] → [B·n, H, S, ...]
            return t.unflatten(2, (n_full, S)).movedim(2, 1).flatten(0, 1)

        P0 = P.new_zeros(B * n_full, H, d, d)
        qt, Pn = qk_project(P0, fold(q[:, :, sl]), fold(k[:, :, sl]))
        y = 0
        for m, init in enumerate(inits):
            lr, eta, alpha = (fold(g[:, :, sl, None])[..., 0] for g in gates[1 + m])
            init = {n: w.unsqueeze(1).expand(B, n_full, *w.shape[1:]).flatten(0, 1) for n, w in init.items()}
            mom0 = {n: torch.zeros_like(w) for n, w in init.items()} if use_mom else None
            ym, w, a, mo = titans_scan_chunked(init, None, mom0, qt, fold(k[:, :, sl]), fold(v[:, :, sl]), lr, eta,
                                               alpha, 0, local_chunks[m], max_grad_norm)
            y = y + ym

            def last(t):  # the last segment's final state
                return t.unflatten(0, (B, n_full))[:, -1]

            locs[m] = LayerState(weights={n: last(t) for n, t in w.items()},
                                 anchor=None if a is None else {n: last(t) for n, t in a.items()},
                                 opt={} if mo is None else {"momentum": {n: last(t) for n, t in mo.items()}})
        P = Pn.unflatten(0, (B, n_full))[:, -1]
        pieces.append(y.unflatten(0, (B, n_full)).movedim(1, 2).flatten(2, 3))
    if tail:
        y, locs, P = run(slice(T - tail, T), fresh(B), torch.zeros_like(P), 0)
        pieces.append(y)
    if (position + T) % reset_period == 0:  # the state at a reset boundary is the reset state
        locs, P = fresh(B), torch.zeros_like(P)
    return o + torch.cat(pieces, 2), glob, locs, P
