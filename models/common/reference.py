"""Token-by-token reference of every memory layer: the executable definition, slow and plain.

One generic loop (:func:`memory_scan_reference`) runs any layer given its four parts as a
:class:`common.parts.Recipe`. Per (batch, head), for token t at in-chunk index i = t mod b:

    g_t = ∇_θ ℓ(θ'; k_t, v_t)      θ' = grad_point(anchor, θ_{t-1}) (the chunk's first weights for
                                     "frozen-gradient" chunking), by ``torch.func.grad``
    θ_t, opt = token_step(anchor, θ_{t-1}, opt, g_t, gates_t, i)     optimizer + retention
    o_t = read(θ_t, q_t)
    if i = b − 1:  θ_t, opt = chunk_end(…);  anchor ← θ_t

TTT (:func:`ttt_scan_reference`) is one recipe of it; the other layers build theirs in their
own files. Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch

from .parts import InnerKnobs, Recipe, clip_grad_per_layer


def memory_scan_reference(
    recipe: Recipe,
    weights: dict,
    anchor: dict | None,
    opt: dict,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict,
    extra: dict,
    position: int,
    knobs: InnerKnobs | None = None,
    init: dict | None = None,
    prev_key: torch.Tensor | None = None,
):
    """Runs T tokens one at a time from (weights, anchor, opt) at absolute position ``position``.

    q, k, v: [B, H, T, d]; gates: name → [B, H, T]; extra: name → [B, H, ...] per-head slow tensors;
    weights/anchor/opt: dicts of [B, H, ...] (opt may nest one level). anchor None = ``weights``.
    Returns (o [B, H, T, d_out], weights, anchor-or-None (None at a chunk boundary), opt).

    With ``knobs`` (:class:`common.parts.InnerKnobs`) the inner-loop knobs are applied here, generically,
    for token t at position p = position + t (its position in the document):

        η ← η/(1 + p·decay) for every gate in ``recipe.lr_gates``
        next_token: the pair is (k_{t−1}, v_t) (``prev_key`` before the first token; none at a
                    document start: the lr gates are 0 for that token)
        for s = 1..K (``steps``; k, v and any gate may carry a sub-step dim: [B, H, T, K, d], [B, H, T, K]):
            θ' = grad_point(anchor, θ, gates_s) for s = 1, else θ (the weights after sub-step s − 1)
            g = grad_transform(∇ℓ(θ'; k_s, v_s));  g ← clip_per_layer(g, τ);  g ← g + λ(θ' − θ_init)
            θ, opt = token_step(anchor, θ, opt, g, gates_s, i)     (retention gates neutral for s > 1)
    and the return gets a 5th element: the last key (for next_token's ``prev_key``).

    With K > 1 and ``opt`` a list of K dicts (required for frozen-gradient chunks, b > 1), one pair
    per token, the K steps are K chains of (θ, optimizer state), all starting at the chunk start
    (``weights`` may then be a list of K dicts: the chains' weights mid-chunk): step s of token t takes
    its gradient at θ_t^(s−1) (its weights in chain s − 1; θ^(0) = the anchor) and chain s is stepped
    with the cumulative gradient Σ_{k≤s} g_t^(k); the output reads chain K; a chunk end resets all
    chains to chain K. For mini-batch GD (TTT) that is

        θ_t^(s) = θ₀ − s_i Σ_{j≤t} η_j Σ_{k≤s} ∇ℓ_j(θ_j^(k−1))        o_t = read(θ_t^(K))

    (causal: token j only ever uses tokens ≤ j; for b = 1 it is K plain GD steps; K = 1 is the rule).
    Weights and optimizer states are then returned as lists (one per chain).
    """
    with_knobs = knobs is not None
    knobs = knobs or InnerKnobs()
    b, K = recipe.chunk_size, knobs.steps
    chains = K > 1 and isinstance(opt, list)  # one optimizer state per step (required for b > 1)
    if K > 1 and b > 1 and not chains:
        raise ValueError("inner_steps > 1 on frozen-gradient chunks needs one optimizer state per step (opt: a list)")
    T = q.shape[2]
    one_pair = k.dim() == 4
    if one_pair:  # one (k, v) pair per token
        k, v = k.unsqueeze(3), v.unsqueeze(3)
    last_key = k[:, :, -1, 0] if one_pair else k[:, :, -1]
    if knobs.next_token:
        first = k[:, :, :1] * 0 if prev_key is None else prev_key.reshape(k[:, :, :1].shape).to(k.dtype)
        k = torch.cat([first, k[:, :, :-1]], 2)
    grad_fn = torch.func.vmap(torch.func.vmap(torch.func.grad(recipe.inner_loss)))
    read_fn = torch.func.vmap(torch.func.vmap(recipe.read))
    anchor = (weights[-1] if isinstance(weights, list) else weights) if anchor is None else anchor
    if chains:
        return _chained_steps(recipe, weights, anchor, opt, q, k, v, gates, extra, position, knobs, init, grad_fn,
                              read_fn, lr_zero_first=knobs.next_token and prev_key is None, last_key=last_key)
    outputs = []
    for t in range(T):
        p = position + t
        i = p % b
        lr_scale = 1.0 / (1.0 + p * knobs.lr_decay)
        if knobs.next_token and t == 0 and prev_key is None:
            lr_scale = 0.0  # a document's first token has no training pair
        for s in range(K):
            g_t = {}
            for n, g in gates.items():
                g = g[:, :, t, s] if g.dim() == 4 else g[:, :, t]
                if s > 0 and n in recipe.retention_neutral:
                    g = torch.full_like(g, recipe.retention_neutral[n])
                if n in recipe.lr_gates:
                    g = g * lr_scale
                g_t[n] = g[:, :, None, None]
            point = recipe.grad_point(anchor, weights, g_t) if s == 0 else weights
            grad = grad_fn(point, k[:, :, t, s : s + 1], v[:, :, t, s : s + 1], extra)
            if recipe.grad_transform is not None:
                grad = recipe.grad_transform(grad)
            grad = clip_grad_per_layer(grad, knobs.grad_clip)
            if knobs.init_pull:
                grad = {n: grad[n] + knobs.init_pull * (point[n] - init[n]) for n in grad}
            weights, opt = recipe.token_step(anchor, weights, opt, grad, g_t, i)
        outputs.append(read_fn(weights, q[:, :, t : t + 1], extra))
        if i == b - 1:
            weights, opt = recipe.chunk_end(anchor, weights, opt, g_t)
            anchor = weights
    at_boundary = (position + T) % b == 0
    result = (torch.cat(outputs, dim=2), weights, (None if at_boundary else anchor), opt)
    return (*result, last_key) if with_knobs else result


def _chained_steps(recipe, weights, anchor, opts, q, k, v, gates, extra, position, knobs, init, grad_fn, read_fn,
                   lr_zero_first, last_key):
    """K > 1 steps on frozen-gradient chunks (see :func:`memory_scan_reference`): K optimizer chains
    (``weights`` one dict, or a list of K when the chains' weights differ mid-chunk, as with Titans'
    recurrent memory). Returns the K chains' weights and optimizer states as lists."""
    b, K, T = recipe.chunk_size, knobs.steps, q.shape[2]
    thetas = list(weights) if isinstance(weights, list) else [weights] * K
    opts, outputs = list(opts), []
    for t in range(T):
        p = position + t
        i = p % b
        lr_scale = 0.0 if (lr_zero_first and t == 0) else 1.0 / (1.0 + p * knobs.lr_decay)
        g_t = {n: (g[:, :, t] * (lr_scale if n in recipe.lr_gates else 1.0))[:, :, None, None] for n, g in gates.items()}
        point, cum = recipe.grad_point(anchor, thetas[0], g_t), None
        for s in range(K):
            grad = grad_fn(point, k[:, :, t, 0:1], v[:, :, t, 0:1], extra)
            if recipe.grad_transform is not None:
                grad = recipe.grad_transform(grad)
            grad = clip_grad_per_layer(grad, knobs.grad_clip)
            if knobs.init_pull:
                grad = {n: grad[n] + knobs.init_pull * (point[n] - init[n]) for n in grad}
            cum = grad if cum is None else {n: cum[n] + grad[n] for n in grad}
            thetas[s], opts[s] = recipe.token_step(anchor, thetas[s], opts[s], cum, g_t, i)
            point = thetas[s]
        outputs.append(read_fn(thetas[-1], q[:, :, t : t + 1], extra))
        if i == b - 1:
            weights, opt = recipe.chunk_end(anchor, thetas[-1], opts[-1], g_t)
            thetas, opts, anchor = [weights] * K, [opt] * K, weights
    at_boundary = (position + T) % b == 0
    return torch.cat(outputs, dim=2), thetas, (None if at_boundary else anchor), opts, last_key
