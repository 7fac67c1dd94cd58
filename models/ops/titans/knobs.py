"""Titans' chunked scan with the inner-loop knobs (the rules: ``common/knobs.py``; the definition:
``memory_scan_reference`` with ``titans_recipe``). Only torch is imported.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...common.backprop import backprop_at, gelu_tanh_grad, soft_clamp_factor
from ...common.knobs import clip_outer, lr_schedule, next_token_pairs
from ...common.parts import InnerKnobs, gelu_tanh
from ...common.reference import memory_scan_reference
from .chunk import titans_coefficients, titans_scan_chunked
from .naive import titans_recipe


def titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs, init: dict | None):
    """Titans' chunk form with clipping (after its soft clamp) and the pull-to-init (``lr`` and ``k``
    already carry the schedule and next_token). Same contract as ``ops.titans.chunk.titans_scan_chunked``;
    one chunk (or a part of one) at a time. With u_j = X_jᵀΔ_j + R, R = λ(M_{t'} − M_init):
    M_t = β_t M + f_t S + Σ_j c_tj X_jᵀΔ_j + (Σ_j c_tj) R."""
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
        xs, ds = backprop_at(anc, k[:, :, sl], v[:, :, sl], max_grad_norm)
        ds = [clip_outer(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]
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



def titans_scan_with_knobs(memory, state, q, k, v, lr, eta, alpha):
    """``TitansMemory.scan`` with the knobs, chunked or token by token (``scan_impl``).
    Returns (o, weights, anchor-or-None, momentum-or-None, extra state): extra holds ``prev_key``
    (next_token) and, with ``inner_steps`` K > 1 inside a chunk, the other chains' memories
    ``chains = {"weights@s": …, "momentum@s": …}`` for s < K (chain K is weights/momentum)."""
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
        o, w, anc, mom = titans_scan_chunked(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                             memory.chunk_size, memory.max_grad_norm)
        return pack(o, [w], anc, None if mom is None else [mom], last_key)
    o, w, anc, mom = titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                       memory.chunk_size, memory.max_grad_norm, knobs, init)
    return pack(o, [w], anc, None if mom is None else [mom], last_key)



# Titans, K steps


def _titans_chain_backprop(W, S, Xs, Ds, k, v, coeffs, max_norm, tau):
    """Per-token inputs and errors of ½‖M_j(k_j) − v_j‖² at each token's own memory in a chain that
    starts from (W, S) and has taken the steps (Xs, Ds) so far (lists over steps of per-layer tensors):
    layer l reads Z = diag(β) H W + diag(f) H S + Σ_k (C ⊙ H X_kᵀ) Δ_k, and the error goes back through
    each token's own W_{l,j}: δ W_{l,j}ᵀ = diag(β) δ Wᵀ + diag(f) δ Sᵀ + Σ_k (C ⊙ δ Δ_kᵀ) X_k."""
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
            d = back * gelu_tanh_grad(zs[i - 1])
    if max_norm:
        ds = [D * soft_clamp_factor(X.norm(dim=-1, keepdim=True) * D.norm(dim=-1, keepdim=True), max_norm)
              for X, D in zip(xs, ds)]
    return xs, [clip_outer(D, X, tau) for X, D in zip(xs, ds)]


def titans_scan_steps(chains_w, chains_m, anchor, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs):
    """Titans with K = ``knobs.steps`` chains (common.reference.memory_scan_reference): chain s runs the momentum
    and decay recurrences on u_j^(≤s) = Σ_{k≤s} ∇ℓ_j(M_j^(k−1)), M_j^(k−1) token j's memory in chain k − 1
    (M^(0) = the chunk's first memory); the output reads chain K; a chunk end resets every chain to K.
    chains_w/chains_m: K lists of per-layer tensors (momentum None for sgd); anchor: per-layer list.
    Returns (o, chains_w, chains_m, anchor-or-None)."""
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
        xs, ds = backprop_at(anchor, ks, vs, max_grad_norm)
        Xs, Ds = [xs], [[clip_outer(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]]
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
