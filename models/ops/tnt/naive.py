"""TNT token by token (the definition ``ops/tnt/chunk.py`` is held to). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.backprop import soft_clamp_factor
from ...common.parts import deep_mlp_memory, l2_loss, momentum_step
from ...common.state import LayerState
from .chunk import soft_unit


def tnt_scan_reference(glob: LayerState, locs: list, P, inits: list, q, k, v, gates: list, position: int,
                       global_chunk: int, local_chunks: list, reset_period: int, max_grad_norm=None):
    """Same contract as :func:`tnt_scan_chunked`, one token at a time, gradients by torch.func.grad."""
    grad_fn = torch.func.vmap(torch.func.vmap(torch.func.grad(lambda th, k_t, v_t: l2_loss(deep_mlp_memory(th, k_t), v_t))))
    read_fn = torch.func.vmap(torch.func.vmap(deep_mlp_memory))
    use_mom = "momentum" in glob.opt
    B = q.shape[0]

    def fresh():
        return [{"w": {n: w.expand(B, *w.shape[1:]) for n, w in init.items()}, "a": None,
                 "m": {n: torch.zeros_like(w).expand(B, *w.shape[1:]) for n, w in init.items()} if use_mom else None}
                for init in inits]

    def step(mem, point, t, g):
        lr, eta, alpha = (x[:, :, t, None, None] for x in g)
        u = grad_fn(point, k[:, :, t : t + 1], v[:, :, t : t + 1])
        u = {n: x * soft_clamp_factor(x.norm(dim=(-2, -1), keepdim=True), max_grad_norm) for n, x in u.items()}
        if mem["m"] is None:
            mem["w"] = {n: (1 - alpha) * mem["w"][n] - lr * u[n] for n in u}
        else:
            mem["w"], mem["m"] = momentum_step(mem["w"], mem["m"], u, lr, eta, alpha)

    g_mem = {"w": glob.weights, "a": glob.anchor or glob.weights, "m": glob.opt.get("momentum")}
    l_mem = [{"w": s.weights, "a": s.anchor or s.weights, "m": s.opt.get("momentum")} for s in locs]
    outs = []
    for t in range(q.shape[2]):
        p = position + t
        if p % reset_period == 0:
            l_mem, P = fresh(), torch.zeros_like(P)
        if p % global_chunk == 0:
            g_mem["a"] = g_mem["w"]
        o = read_fn(g_mem["a"], q[:, :, t : t + 1])  # read before update, at the chunk's start
        step(g_mem, g_mem["a"], t, gates[0])
        k_t = k[:, :, t : t + 1]
        P = P + (k_t / k_t.norm(dim=-1, keepdim=True)).transpose(-1, -2) @ (k_t / k_t.norm(dim=-1, keepdim=True))
        q_t = soft_unit(q[:, :, t : t + 1] @ P)
        for m, mem in enumerate(l_mem):
            if p % local_chunks[m] == 0:
                mem["a"] = mem["w"]
            step(mem, mem["a"], t, gates[1 + m])
            o = o + read_fn(mem["w"], q_t)  # read after update
        outs.append(o)
    end = position + q.shape[2]
    if end % reset_period == 0:
        l_mem, P = fresh(), torch.zeros_like(P)

    def pack(mem, chunk):
        return LayerState(weights=mem["w"], anchor=None if end % chunk == 0 else mem["a"],
                          opt={} if mem["m"] is None else {"momentum": mem["m"]})

    return (torch.cat(outs, 2), pack(g_mem, global_chunk), [pack(mm, c) for mm, c in zip(l_mem, local_chunks)], P)
