"""The inner loop's knobs in the chunked forms (``parts.InnerKnobs``; the token-by-token definition is
``reference.memory_scan_reference``, which the tests hold these to).

    inner_steps K        DeltaNet/GDN: DeltaProduct, K (k, v, β) per token, retention once per token;
                         TTT, Titans: K chains, step s's gradient at each token's own chain-(s−1) weights
    inner_grad_clip τ    g_t ← g_t·min(1, τ/‖g_t‖) per token and layer (a weight matrix with its bias)
    inner_init_pull λ    g_t ← g_t + λ(θ' − θ_init), θ' where the gradient is taken
    inner_lr_schedule    η_t ← η_t/(1 + t·decay), t the position in the document
    inner_loss           TTT: "ln_recon" | "mse"; "next_token": token t trains on (k_{t−1}, v_t)

How each fits a chunk rule without giving up exactness:
- the schedule and next_token only change the per-token inputs (lr gates, keys): any chunk form
  takes them as they are (a document's first token has no pair: its lr is 0);
- for an outer-product gradient X_tᵀΔ_t (TTT, Titans) the norm is ‖X_t‖‖Δ_t‖, so clipping is a
  per-token scalar folded into Δ_t;
- with frozen gradients the pull λ(θ₀ − θ_init) is the same for every token of a chunk: the read
  gets −s_i λ(Σ_{j≤i} η_j) q̃(θ₀ − θ_init) (TTT) or (Σ_j c_tj) h(θ₀ − θ_init) (Titans);
- for the delta rule (θ_init = 0, the initial state) the pull is a decay: with ε = βλ,
  S_t = α(1 − ε)(I − β/(1 − ε) kᵀk) S + β kᵀv, a gated delta rule with α' = α(1 − ε),
  β' = β/(1 − ε), v' = (1 − ε) v (needs λ < 1 since β < 1);
- DeltaProduct runs the WY chunk code on the interleaved length-T·K sequence and keeps only each
  token's last sub-step output;
- TTT/Titans K steps: every token's own weights in chain s − 1 are a dual-form expression in the
  chunk start and the per-token errors of steps < s, so the keys are read (and, for MLPs, the error is
  backpropagated) at them by the same dual form: K passes per chunk;
- LaCT: its per-token gradients are outer products too (clip = a factor on each matrix's lr) and its
  chunk sums are taken at the chunk's first weights (the pull adds (Σ_i η_i) λ(W − W_init)).
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .parts import InnerKnobs, clip_factor, gelu_tanh, head_layer_norm
from .parts import gelu_tanh_grad_fused as gelu_tanh_grad
from .parts import ln_fused_l2_grad_fused as ln_fused_l2_grad


def lr_schedule(lr: torch.Tensor, position: int, knobs: InnerKnobs, time_dim: int = 2) -> torch.Tensor:
    """η_t/(1 + t·decay) for the tokens at positions position, position + 1, … along ``time_dim``."""
    if not knobs.lr_decay:
        return lr
    T = lr.shape[time_dim]
    t = torch.arange(position, position + T, device=lr.device, dtype=lr.dtype)
    shape = [1] * lr.dim()
    shape[time_dim] = T
    return lr / (1.0 + t.reshape(shape) * knobs.lr_decay)


def next_token_pairs(k: torch.Tensor, lrs: list, prev_key: torch.Tensor | None):
    """next_token: keys shifted by one token (k_{t−1} for token t); without ``prev_key`` (a document
    start) the first token's lr gates are zeroed. k: [B, H, T, ...]; lrs: [B, H, T, ...] tensors.
    Returns (keys, lrs, the last key for the next call)."""
    first = torch.zeros_like(k[:, :, :1]) if prev_key is None else prev_key.reshape(k[:, :, :1].shape).to(k.dtype)
    if prev_key is None:
        lrs = [torch.cat([torch.zeros_like(lr[:, :, :1]), lr[:, :, 1:]], 2) for lr in lrs]
    return torch.cat([first, k[:, :, :-1]], 2), lrs, k[:, :, -1]


# ------------------------------------------------------------------------------- TTT


def _with_ones(x):
    return F.pad(x, (0, 1), value=1.0)


def _clip(G, X, tau):
    """Per-token clip of the outer-product gradient X̃ᵀG: its norm is ‖X̃‖‖G‖."""
    if tau is None:
        return G
    return G * clip_factor(X.norm(dim=-1, keepdim=True) * G.norm(dim=-1, keepdim=True), tau)


def _ttt_linear_steps(W, Ps, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, K):
    """TTT-Linear with K steps (reference.memory_scan_reference) over n ≤ b tokens of one mini-batch.
    Ps: K cumulative pending sums (step s: Σ_{k≤s} of earlier tokens) or None. With Ĝ^(s) the
    cumulative per-token errors Σ_{k≤s} G^(k), the keys at θ_j^(s) are read by the dual form itself:

        Z^(s) = K̃W̃₀ − s ⊙ K̃P_s − tril(sηᵀ ⊙ (KKᵀ + 1)) Ĝ^(s),   G^(s+1) = ∂ℓ/∂Z at Z^(s) (clipped)

    Returns (z̄, the K new pending sums)."""
    ka, qa = _with_ones(k), _with_ones(q)
    eta = torch.tril(scale[..., :, None] * lr[..., None, :])
    s_col = scale[..., None]
    mix_k = eta * (k @ k.transpose(-1, -2) + 1.0)
    z_k = ka @ W
    G_cum, ups = None, []
    for s in range(K):
        z = z_k
        if s:
            z = z - mix_k @ G_cum
            if Ps is not None:
                z = z - s_col * (ka @ Ps[s - 1])
        G = _clip(z - tgt if mse else ln_fused_l2_grad(z, tgt, ln_w, ln_b), ka, tau)
        G_cum = G if G_cum is None else G_cum + G
        up = (lr[..., None] * ka).transpose(-1, -2) @ G_cum
        ups.append(up if Ps is None else up + Ps[s])
    z_bar = qa @ W - (eta * (q @ k.transpose(-1, -2) + 1.0)) @ G_cum
    if Ps is not None:
        z_bar = z_bar - s_col * (qa @ Ps[-1])
    return z_bar, ups


def _ttt_mlp_steps(W1, W2, Ps, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, K):
    """TTT-MLP with K steps over n ≤ b tokens of one mini-batch (as :func:`_ttt_linear_steps`). Layer 1's
    inputs are the keys at every step, so its errors accumulate (Ĝ1); layer 2's inputs X̃2^(k) change
    with the step, so its term is a sum over the steps so far, and the backprop through each token's own
    W₂ iterate is a dual form too: G2_j W2_jᵀ = G2_j W2₀ᵀ − s_j G2_j P2ᵀ − Σ_k Σ_{l≤j} s_j η_l (G2_j·G2_l^(k)) x2_l^(k).
    Ps: K pairs [P1_s, P2_s] of cumulative pending sums, or None. Returns (z̄, K pairs of new sums)."""
    ka, qa = _with_ones(k), _with_ones(q)
    eta = torch.tril(scale[..., :, None] * lr[..., None, :])
    s_col = scale[..., None]
    mix_k = eta * (k @ k.transpose(-1, -2) + 1.0)
    z1_k = ka @ W1
    G1_cum, X2s, G2s, ups = None, [], [], []
    for s in range(K):
        z1 = z1_k
        if s:
            z1 = z1 - mix_k @ G1_cum
            if Ps is not None:
                z1 = z1 - s_col * (ka @ Ps[s - 1][0])
        x2a = _with_ones(gelu_tanh(z1))
        z2 = x2a @ W2
        back = W2[..., :-1, :].transpose(-1, -2)
        for X, G in zip(X2s, G2s):
            z2 = z2 - (eta * (x2a @ X.transpose(-1, -2))) @ G
        if s and Ps is not None:
            z2 = z2 - s_col * (x2a @ Ps[s - 1][1])
        G2 = z2 - tgt if mse else ln_fused_l2_grad(z2, tgt, ln_w, ln_b)
        d1 = G2 @ back
        for X, G in zip(X2s, G2s):
            d1 = d1 - (eta * (G2 @ G.transpose(-1, -2))) @ X[..., :-1]
        if s and Ps is not None:
            d1 = d1 - s_col * (G2 @ Ps[s - 1][1][..., :-1, :].transpose(-1, -2))
        G1 = _clip(d1 * gelu_tanh_grad(z1), ka, tau)
        G2 = _clip(G2, x2a, tau)
        G1_cum = G1 if G1_cum is None else G1_cum + G1
        X2s.append(x2a)
        G2s.append(G2)
        up1 = (lr[..., None] * ka).transpose(-1, -2) @ G1_cum
        up2 = sum((lr[..., None] * X).transpose(-1, -2) @ G for X, G in zip(X2s, G2s))
        ups.append([up1, up2] if Ps is None else [up1 + Ps[s][0], up2 + Ps[s][1]])
    z1b = qa @ W1 - (eta * (q @ k.transpose(-1, -2) + 1.0)) @ G1_cum
    if Ps is not None:
        z1b = z1b - s_col * (qa @ Ps[-1][0])
    x2b = _with_ones(gelu_tanh(z1b))
    z = x2b @ W2
    for X, G in zip(X2s, G2s):
        z = z - (eta * (x2b @ X.transpose(-1, -2))) @ G
    if Ps is not None:
        z = z - s_col * (x2b @ Ps[-1][1])
    return z, ups


def _ttt_segment(Ws, Ps, Rs, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, pre=None):
    """Dual form over n ≤ b tokens of one mini-batch with the knobs. Ws: folded [W̃1(, W̃2)] at θ₀;
    Ps: pending sums or None; Rs: λ(W̃ − W̃_init) or None; pre: (K̃, Q̃, sηᵀ, sηᵀ ⊙ (QKᵀ + 1)) when
    computed for all mini-batches at once. Returns (z̄, per-layer updates)."""
    if pre is None:
        ka, qa = _with_ones(k), _with_ones(q)
        eta = torch.tril(scale[..., :, None] * lr[..., None, :])  # s_i η_j, j ≤ i
        mix = eta * (q @ k.transpose(-1, -2) + 1.0)
    else:
        ka, qa, eta, mix = pre
    s_col = scale[..., None]
    pull = None if Rs is None else (scale * lr.cumsum(-1))[..., None]  # s_i Σ_{j≤i} η_j

    def grad_out(z):
        return z - tgt if mse else ln_fused_l2_grad(z, tgt, ln_w, ln_b)

    if len(Ws) == 1:
        (W,) = Ws
        G = _clip(grad_out(ka @ W), ka, tau)
        z = qa @ W - mix @ G
        ups = [(lr[..., None] * ka).transpose(-1, -2) @ G]
        xs = [qa]
    else:
        W1, W2 = Ws
        z1 = ka @ W1
        x2a = _with_ones(gelu_tanh(z1))
        G2 = grad_out(x2a @ W2)
        G1 = _clip((G2 @ W2[..., :-1, :].transpose(-1, -2)) * gelu_tanh_grad(z1), ka, tau)
        G2 = _clip(G2, x2a, tau)
        z1b = qa @ W1 - mix @ G1
        if Ps is not None:
            z1b = z1b - s_col * (qa @ Ps[0])
        if Rs is not None:
            z1b = z1b - pull * (qa @ Rs[0])
        x2b = _with_ones(gelu_tanh(z1b))
        z = x2b @ W2 - (eta * (x2b @ x2a.transpose(-1, -2))) @ G2
        ups = [(lr[..., None] * ka).transpose(-1, -2) @ G1, (lr[..., None] * x2a).transpose(-1, -2) @ G2]
        xs = [None, x2b]
    x_last = xs[-1]
    if Ps is not None:
        z = z - s_col * (x_last @ Ps[-1])
        ups = [u + P for u, P in zip(ups, Ps)]
    if Rs is not None:
        z = z - pull * (x_last @ Rs[-1])
        ups = [u + lr.sum(-1)[..., None, None] * R for u, R in zip(ups, Rs)]
    return z, ups


def _ttt_blocks(Ws, Ps, W_init, q, k, tgt, lr, token_offset, ln_w, ln_b, position: int, b: int, knobs: InnerKnobs):
    """One knob step (K = 1) over T tokens: the sequence is padded onto the mini-batch grid (tokens with
    η = 0 in front of a call that starts mid-mini-batch and after one that ends mid-mini-batch: they
    change nothing), everything that does not depend on θ₀ is computed for all mini-batches at once,
    and the loop holds only the θ₀-dependent products. Returns (z̄ [B, H, T, d], Ws, Ps-or-None)."""
    T, off = q.shape[2], position % b
    N = -(-(off + T) // b)
    back = N * b - off - T

    def blocks(x):  # [B, H, T, ...] → N × [B, H, b, ...]
        x = F.pad(x, (0, 0, off, back)) if x.dim() == 4 else F.pad(x, (off, back))
        return x.unflatten(2, (N, b)).movedim(2, 0)

    idx = torch.arange(b, device=q.device)
    scale = torch.clamp_min(1.0 / (idx.to(token_offset.dtype) + 1.0) + token_offset, 0.0)
    qb, kb, tb, lrb = (blocks(x) for x in (q, k, tgt, lr))
    eta = torch.tril(scale[:, None] * lrb[..., None, :])
    pre = zip(_with_ones(kb).unbind(0), _with_ones(qb).unbind(0), eta.unbind(0),
              (eta * (qb @ kb.transpose(-1, -2) + 1.0)).unbind(0))
    outs = []
    for i, (p, qi, ki, ti, li) in enumerate(zip(pre, qb.unbind(0), kb.unbind(0), tb.unbind(0), lrb.unbind(0))):
        Rs = None if W_init is None else [knobs.init_pull * (W - Wi) for W, Wi in zip(Ws, W_init)]
        z, ups = _ttt_segment(Ws, Ps, Rs, qi, ki, ti, li, scale, ln_w, ln_b, knobs.loss == "mse", knobs.grad_clip, p)
        outs.append(z)
        if i < N - 1 or back == 0:
            Ws, Ps = [W - scale[-1] * u for W, u in zip(Ws, ups)], None
        else:
            Ps = ups
    return torch.cat(outs, 2)[:, :, off : off + T], Ws, Ps


def ttt_scan_knobs(kind, anchor, pending, q, k, v, lr, token_offset, ln_weight, ln_bias, position, mini_batch_size,
                   knobs: InnerKnobs, init: dict | None):
    """TTT's chunk form with clipping, pull-to-init and the MSE loss (``lr`` and ``k`` already carry
    the schedule and next_token). Same contract as ``ttt_chunk.ttt_scan_chunked``; one mini-batch
    (or a part of one) at a time."""
    from .ttt_chunk import fold_bias, unfold_bias

    b, T, K = mini_batch_size, q.shape[2], knobs.steps
    in_batch = (position + torch.arange(T, device=q.device)) % b
    scale = torch.clamp_min(1.0 / (in_batch.to(token_offset.dtype) + 1.0) + token_offset[in_batch], 0.0)
    mse = knobs.loss == "mse"
    tgt = v - k
    ln_w, ln_b = ln_weight[:, None, :], ln_bias[:, None, :]
    Ws = fold_bias(anchor)
    Ps = None
    if pending is not None and position % b != 0:  # K > 1: one folded sum per step, "W1@s" for s < K
        Ps = [fold_bias({n: pending[n if s == K else f"{n}@{s}"] for n in anchor}) for s in range(1, K + 1)]
        Ps = Ps if K > 1 else fold_bias(pending)
    W_init = fold_bias(init) if knobs.init_pull else None
    if K == 1:
        z_bar, Ws, Ps = _ttt_blocks(Ws, Ps, W_init, q, k, tgt, lr, token_offset, ln_w, ln_b, position, b, knobs)
        out = q + (z_bar if mse else head_layer_norm(z_bar, ln_w, ln_b))
        return out, unfold_bias(Ws), (None if Ps is None else unfold_bias(Ps))
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        Rs = None if W_init is None else [knobs.init_pull * (W - Wi) for W, Wi in zip(Ws, W_init)]
        args = (q[:, :, sl], k[:, :, sl], tgt[:, :, sl], lr[:, :, sl], scale[sl], ln_w, ln_b, mse, knobs.grad_clip)
        if K > 1 and len(Ws) == 1:  # ups/Ps: one list of folded sums per step
            z, ups = _ttt_linear_steps(Ws[0], None if Ps is None else [P[0] for P in Ps], *args, K)
            ups = [[u] for u in ups]
        elif K > 1:
            z, ups = _ttt_mlp_steps(*Ws, Ps, *args, K)
        else:
            z, ups = _ttt_segment(Ws, Ps, Rs, *args)
        outs.append(z)
        if (position + stop) % b == 0:
            last = ups[-1] if K > 1 else ups
            Ws, Ps = [W - scale[stop - 1] * u for W, u in zip(Ws, last)], None
        else:
            Ps = ups
        start = stop
    z_bar = torch.cat(outs, 2)
    out = q + (z_bar if mse else head_layer_norm(z_bar, ln_w, ln_b))
    if Ps is not None and K > 1:
        pend = {}
        for s, P in enumerate(Ps, start=1):
            pend.update({(n if s == K else f"{n}@{s}"): t for n, t in unfold_bias(P).items()})
        return out, unfold_bias(Ws), pend
    return out, unfold_bias(Ws), (None if Ps is None else unfold_bias(Ps))


# ------------------------------------------------------------------------------- Titans


def titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs, init: dict | None):
    """Titans' chunk form with clipping (after its soft clamp) and the pull-to-init (``lr`` and ``k``
    already carry the schedule and next_token). Same contract as ``titans.titans_scan_chunked``;
    one chunk (or a part of one) at a time. With u_j = X_jᵀΔ_j + R, R = λ(M_{t'} − M_init):
    M_t = β_t M + f_t S + Σ_j c_tj X_jᵀΔ_j + (Σ_j c_tj) R."""
    from .titans import _backprop_at, titans_coefficients

    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = cur if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    ini = None if not knobs.init_pull else [init[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    b, T = chunk_size, q.shape[2]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        c, s_last, beta, f, m = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        xs, ds = _backprop_at(anc, k[:, :, sl], v[:, :, sl], max_grad_norm)
        ds = [_clip(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]
        Rs = None if ini is None else [knobs.init_pull * (A - I) for A, I in zip(anc, ini)]
        c_sum = c.sum(-1)  # Σ_j c_tj
        h, L = q[:, :, sl], len(cur)
        for i in range(L):
            z = beta[..., None] * (h @ cur[i]) + (c * (h @ xs[i].transpose(-1, -2))) @ ds[i]
            if mom is not None:
                z = z + f[..., None] * (h @ mom[i])
            if Rs is not None:
                z = z + c_sum[..., None] * (h @ Rs[i])
            h = gelu_tanh(z) if i < L - 1 else z
        outs.append(h)
        c_last = c[..., -1, :, None]
        new_w = [beta[..., -1:, None] * W + (c_last * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
        if Rs is not None:
            new_w = [W + c_sum[..., -1:, None] * R for W, R in zip(new_w, Rs)]
        if mom is not None:
            new_m = [m[..., -1:, None] * S + (s_last[..., :, None] * X).transpose(-1, -2) @ D
                     for S, X, D in zip(mom, xs, ds)]
            if Rs is not None:
                new_m = [S + s_last.sum(-1)[..., None, None] * R for S, R in zip(new_m, Rs)]
            new_w = [W + f[..., -1:, None] * S for W, S in zip(new_w, mom)]
            mom = new_m
        cur = new_w
        if (position + stop) % b == 0:
            anc = cur
        start = stop
    o = torch.cat(outs, 2)
    at_boundary = (position + T) % b == 0
    return (o, dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))


# ------------------------------------------------------------------------------- delta rule


def delta_knob_inputs(q, k, v, beta, log_alpha, knobs: InnerKnobs, position: int, prev_key):
    """(Gated) DeltaNet with the knobs as a plain gated delta rule on T·K sub-steps.

    q: [B, H, T, d]; k, v: [B, H, T, K, d]; beta: [B, H, T, K]; log_alpha: [B, H, T] or None.
    Returns (q, k, v, β, log α) of length T·K for ``delta_rule_chunked`` (read: every K-th output,
    see :func:`delta_read_last`) and the last key (for next_token)."""
    B, H, T, K, d = k.shape
    beta = lr_schedule(beta, position, knobs)
    last_key = None
    if knobs.next_token:
        k, (beta,), last_key = next_token_pairs(k, [beta], prev_key)
    la = torch.zeros_like(beta)
    if log_alpha is not None:
        la = torch.cat([log_alpha[..., None], la[..., 1:]], -1)  # retention once per token
    if knobs.init_pull:  # S_init = 0: the pull is a decay (module docstring)
        keep = 1 - beta * knobs.init_pull
        la, beta, v = la + torch.log(keep), beta / keep, v * keep[..., None]
    q_sub = torch.zeros(B, H, T, K, q.shape[-1], dtype=q.dtype, device=q.device)
    q_sub[:, :, :, -1] = q
    return (q_sub.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), beta.flatten(2, 3), la.flatten(2, 3)), last_key


def delta_read_last(o: torch.Tensor, K: int) -> torch.Tensor:
    """The outputs of each token's last sub-step: [B, H, T·K, d] → [B, H, T, d]."""
    return o.unflatten(2, (o.shape[2] // K, K))[:, :, :, -1]


def titans_scan_with_knobs(memory, state, q, k, v, lr, eta, alpha):
    """``TitansMemory.scan``'s inner loop with the knobs, chunked or token by token (``scan_impl``).
    Returns (o, weights, anchor-or-None, momentum-or-None, extra state): extra holds ``prev_key``
    (next_token) and, with ``inner_steps`` K > 1 inside a chunk, the other chains' memories
    ``chains = {"weights@s": …, "momentum@s": …}`` for s < K (chain K is weights/momentum)."""
    from dataclasses import replace

    from .reference import memory_scan_reference
    from .titans import soft_clamp_factor, titans_recipe

    knobs, compute, B = memory.knobs, q.dtype, q.shape[0]
    K = knobs.steps
    cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
    weights, anchor, momentum = cast(state.weights), cast(state.anchor), cast(state.opt.get("momentum"))
    init = {n: getattr(memory, n).to(compute).unsqueeze(0).expand(B, *getattr(memory, n).shape)
            for n in memory.fast_weight_names}
    prev_key = state.extra.get("prev_key")
    chains = state.extra.get("chains") or {}
    chain_w = [cast(chains.get(f"weights@{s}", weights)) for s in range(1, K)] + [weights]
    chain_m = None if momentum is None else [cast(chains.get(f"momentum@{s}", momentum)) for s in range(1, K)] + [momentum]

    def pack(o, ws, anc, ms, last_key):
        extra = {} if last_key is None else {"prev_key": last_key}
        if K > 1 and anc is not None:  # mid-chunk: the chains differ
            extra["chains"] = {f"weights@{s}": ws[s - 1] for s in range(1, K)}
            if ms is not None:
                extra["chains"].update({f"momentum@{s}": ms[s - 1] for s in range(1, K)})
        return o, ws[-1], anc, None if ms is None else ms[-1], extra

    if memory.scan_impl == "reference":
        tau = memory.max_grad_norm

        def soft_clamp(grad):  # Titans' own guard, on the loss gradient (before the knobs)
            return {n: t * soft_clamp_factor(t.norm(dim=(-2, -1), keepdim=True), tau) for n, t in grad.items()}

        recipe = replace(titans_recipe(memory.chunk_size, momentum is not None, None), grad_transform=soft_clamp,
                         retention_neutral={"alpha": 0.0})
        opt = [{} if m is None else {"momentum": m} for m in (chain_m or [None] * K)]
        o, w, anc, opt, last_key = memory_scan_reference(recipe, chain_w if K > 1 else weights, anchor,
                                                         opt if K > 1 else opt[0], q, k, v,
                                                         {"lr": lr, "eta": eta, "alpha": alpha}, {}, state.position,
                                                         knobs, init, prev_key)
        ws, ops = (w, opt) if K > 1 else ([w], [opt])
        ms = None if momentum is None else [op["momentum"] for op in ops]
        return pack(o, ws, anc, ms, last_key if knobs.next_token else None)
    lr = lr_schedule(lr, state.position, knobs)
    last_key = None
    if knobs.next_token:
        k, (lr,), last_key = next_token_pairs(k, [lr], prev_key)
    if K > 1:
        names = sorted(weights, key=lambda n: int(n[1:]))
        anc = [(anchor or weights)[n] for n in names]
        o, ws, ms, anc = titans_scan_steps([[w[n] for n in names] for w in chain_w],
                                           None if chain_m is None else [[m_[n] for n in names] for m_ in chain_m],
                                           anc, q, k, v, lr, eta, alpha, state.position, memory.chunk_size,
                                           memory.max_grad_norm, knobs)
        as_dict = (lambda lst: dict(zip(names, lst)))
        return pack(o, [as_dict(w) for w in ws], None if anc is None else as_dict(anc),
                    None if ms is None else [as_dict(m_) for m_ in ms], last_key)
    if knobs.inputs_only:  # schedule / next_token change only the inputs: the plain fast scan
        from .titans import titans_scan_chunked

        o, w, anc, mom = titans_scan_chunked(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                             memory.chunk_size, memory.max_grad_norm)
        return pack(o, [w], anc, None if mom is None else [mom], last_key)
    o, w, anc, mom = titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                       memory.chunk_size, memory.max_grad_norm, knobs, init)
    return pack(o, [w], anc, None if mom is None else [mom], last_key)


# ------------------------------------------------------------------------------- LaCT


def lact_clipped_lrs(W: dict, k, v, lrs: list, tau: float | None) -> list:
    """LaCT's per-token gradients are outer products (W0: kᵀ(e ⊙ z ⊙ silu′(a)), W1: hᵀv, W2: kᵀ(e ⊙ silu(a))),
    so clipping each to norm ≤ τ is a per-token factor on its lr: returns the clipped [lr0, lr1, lr2]."""
    if tau is None:
        return lrs
    a, z = k @ W["W0"], k @ W["W2"]
    sig = torch.sigmoid(a)
    h = a * sig * z
    e = v @ W["W1"].transpose(-1, -2)
    kn = k.norm(dim=-1)
    norms = [kn * (e * z * sig * (1 + a * (1 - sig))).norm(dim=-1), h.norm(dim=-1) * v.norm(dim=-1),
             kn * (e * a * sig).norm(dim=-1)]
    return [lr * clip_factor(n, tau) for lr, n in zip(lrs, norms)]


def lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                    chunk_size: int, muon: bool, knobs: InnerKnobs, init: dict | None):
    """LaCT's chunk form with clipping and the pull-to-init (``lr*`` and ``k`` already carry the
    schedule and next_token); same contract as ``lact.lact_scan_chunked``. The gradients of a chunk
    are taken at its first weights W, so the pull adds (Σ_i η_{n,i}) λ(W_n − W_n,init) to each sum."""
    from .lact import NAMES, lact_commit, lact_grads
    from .parts import swiglu_memory

    C, T = chunk_size, q.shape[2]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + C - (position + start) % C)
        sl = slice(start, stop)
        outs.append(swiglu_memory(weights, q[:, :, sl]))
        vs = v[:, :, sl]
        if knobs.loss == "mse":  # ℓ = ½‖f(k) − v‖² = the dot-product loss's gradients with v → v − f_W(k)
            vs = vs - swiglu_memory(weights, k[:, :, sl])
        lrs = lact_clipped_lrs(weights, k[:, :, sl], vs, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]],
                               knobs.grad_clip)
        g = lact_grads(weights, k[:, :, sl], vs, *lrs)
        if knobs.init_pull:
            g = {n: g[n] + lr.sum(-1)[..., None, None] * knobs.init_pull * (weights[n] - init[n])
                 for n, lr in zip(NAMES, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]])}
        pending = g if pending is None else {n: pending[n] + g[n] for n in NAMES}
        ms = m[:, :, sl].sum(-1)
        m_sum = ms if m_sum is None else m_sum + ms
        if (position + stop) % C == 0:
            weights, momentum = lact_commit(weights, pending, m_sum / C, momentum, init_norms, muon)
            pending = m_sum = None
        start = stop
    return torch.cat(outs, 2), weights, pending, m_sum, momentum


def lact_scan_with_knobs(layer, state_args, q, k, v, lr0, lr1, lr2, m, init_norms, position: int, prev_key):
    """``LaCTLayer``'s fast-weight scan with the knobs, chunked or token by token (``scan_impl``).
    state_args: (weights, pending, m_sum, momentum). Returns (o, weights, pending, m_sum, momentum, last key)."""
    from .lact import NAMES, lact_recipe
    from .reference import memory_scan_reference

    knobs, B, compute = layer.knobs, q.shape[0], q.dtype
    weights, pending, m_sum, momentum = state_args
    init = {n: getattr(layer, n).to(compute).unsqueeze(0).expand(B, *getattr(layer, n).shape) for n in NAMES}
    if layer.scan_impl == "reference":
        H = q.shape[1]
        opt = {"pending": pending if pending is not None else {n: torch.zeros_like(w) for n, w in weights.items()},
               "m_sum": m_sum if m_sum is not None else q.new_zeros(B, H)}
        if momentum is not None:
            opt["momentum"] = momentum
        recipe = lact_recipe(layer.chunk_size, init_norms, layer.muon, momentum is not None)
        if knobs.loss == "mse":
            from dataclasses import replace

            from .parts import l2_loss, swiglu_memory

            recipe = replace(recipe, inner_loss=lambda theta, k_t, v_t, extra: l2_loss(swiglu_memory(theta, k_t), v_t))
        o, weights, anchor, opt, last_key = memory_scan_reference(
            recipe, weights, None, opt, q, k, v, {"lr0": lr0, "lr1": lr1, "lr2": lr2, "m": m}, {}, position, knobs,
            init, prev_key)
        mid = anchor is not None
        return (o, weights, opt["pending"] if mid else None, opt["m_sum"] if mid else None, opt.get("momentum"),
                last_key if knobs.next_token else None)
    lr0, lr1, lr2 = (lr_schedule(lr, position, knobs) for lr in (lr0, lr1, lr2))
    last_key = None
    if knobs.next_token:
        k, (lr0, lr1, lr2), last_key = next_token_pairs(k, [lr0, lr1, lr2], prev_key)
    return (*lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position,
                             layer.chunk_size, layer.muon, knobs, init), last_key)


# ------------------------------------------------------------------------------- Titans, K steps


def _titans_chain_backprop(W, S, Xs, Ds, k, v, coeffs, max_norm, tau):
    """Per-token inputs and errors of ½‖M_j(k_j) − v_j‖² at each token's own memory in a chain that
    starts from (W, S) and has taken the steps (Xs, Ds) so far (lists over steps of per-layer tensors):
    layer l reads Z = diag(β) H W + diag(f) H S + Σ_k (C ⊙ H X_kᵀ) Δ_k, and the error goes back through
    each token's own W_{l,j}: δ W_{l,j}ᵀ = diag(β) δ Wᵀ + diag(f) δ Sᵀ + Σ_k (C ⊙ δ Δ_kᵀ) X_k."""
    from .titans import gelu_tanh_grad as gelu_grad
    from .titans import soft_clamp_factor

    c, _, beta, f, _ = coeffs
    L = len(W)
    xs, zs, h = [], [], k
    for i in range(L):
        xs.append(h)
        z = beta[..., None] * (h @ W[i])
        if S is not None:
            z = z + f[..., None] * (h @ S[i])
        for X, D in zip(Xs, Ds):
            z = z + (c * (h @ X[i].transpose(-1, -2))) @ D[i]
        zs.append(z)
        h = gelu_tanh(z) if i < L - 1 else z
    d, ds = h - v, [None] * L
    for i in range(L - 1, -1, -1):
        ds[i] = d
        if i:
            back = beta[..., None] * (d @ W[i].transpose(-1, -2))
            if S is not None:
                back = back + f[..., None] * (d @ S[i].transpose(-1, -2))
            for X, D in zip(Xs, Ds):
                back = back + (c * (d @ D[i].transpose(-1, -2))) @ X[i]
            d = back * gelu_grad(zs[i - 1])
    if max_norm:
        ds = [D * soft_clamp_factor(X.norm(dim=-1, keepdim=True) * D.norm(dim=-1, keepdim=True), max_norm)
              for X, D in zip(xs, ds)]
    return xs, [_clip(D, X, tau) for X, D in zip(xs, ds)]


def titans_scan_steps(chains_w, chains_m, anchor, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs):
    """Titans with K = ``knobs.steps`` chains (reference.memory_scan_reference): chain s runs the momentum
    and decay recurrences on u_j^(≤s) = Σ_{k≤s} ∇ℓ_j(M_j^(k−1)), M_j^(k−1) token j's memory in chain k − 1
    (M^(0) = the chunk's first memory); the output reads chain K; a chunk end resets every chain to K.
    chains_w/chains_m: K lists of per-layer tensors (momentum None for sgd); anchor: per-layer list.
    Returns (o, chains_w, chains_m, anchor-or-None)."""
    from .titans import _backprop_at, titans_coefficients

    K, b, T = knobs.steps, chunk_size, q.shape[2]
    if chains_m is None:
        eta = torch.zeros_like(eta)
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        coeffs = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        c, s_last, beta, f, m = coeffs
        ks, vs = k[:, :, sl], v[:, :, sl]
        xs, ds = _backprop_at(anchor, ks, vs, max_grad_norm)
        Xs, Ds = [xs], [[_clip(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]]
        for s in range(1, K):
            xs, ds = _titans_chain_backprop(chains_w[s - 1], None if chains_m is None else chains_m[s - 1], Xs, Ds,
                                            ks, vs, coeffs, max_grad_norm, knobs.grad_clip)
            Xs.append(xs)
            Ds.append(ds)
        h, L = q[:, :, sl], len(anchor)
        for i in range(L):
            z = beta[..., None] * (h @ chains_w[-1][i])
            if chains_m is not None:
                z = z + f[..., None] * (h @ chains_m[-1][i])
            for X, D in zip(Xs, Ds):
                z = z + (c * (h @ X[i].transpose(-1, -2))) @ D[i]
            h = gelu_tanh(z) if i < L - 1 else z
        outs.append(h)
        c_last = c[..., -1, :, None]
        new_w, new_m = [], []
        for s in range(K):
            w = [beta[..., -1:, None] * W + sum((c_last * X[i]).transpose(-1, -2) @ D[i] for X, D in zip(Xs[: s + 1], Ds[: s + 1]))
                 for i, W in enumerate(chains_w[s])]
            if chains_m is not None:
                w = [W + f[..., -1:, None] * S for W, S in zip(w, chains_m[s])]
                new_m.append([m[..., -1:, None] * S + sum((s_last[..., :, None] * X[i]).transpose(-1, -2) @ D[i]
                                                          for X, D in zip(Xs[: s + 1], Ds[: s + 1]))
                              for i, S in enumerate(chains_m[s])])
            new_w.append(w)
        chains_w, chains_m = new_w, (new_m if chains_m is not None else None)
        if (position + stop) % b == 0:
            chains_w = [chains_w[-1]] * K
            chains_m = None if chains_m is None else [chains_m[-1]] * K
            anchor = chains_w[-1]
        start = stop
    at_boundary = (position + T) % b == 0
    return torch.cat(outs, 2), chains_w, chains_m, (None if at_boundary else anchor)
