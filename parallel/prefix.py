"""All-gather + prefix combine: context parallelism without a serial chain, for affine updates.

When a memory layer's state update is affine in the state (DeltaNet, gated DeltaNet, linear
attention, linear Titans memory), a whole piece of the sequence acts on the incoming state as

    S_out = S_in · A_r + B_r          A_r = Π_t (α_t (I − β_t k_t k_tᵀ)),  B_r = the piece run from S = 0

so every rank summarises its piece by (A_r, B_r) in parallel, the summaries are all-gathered, and
rank r folds the ones before it into its incoming state (P−1 small matmuls):

    S_in(r) = (…((S_0 · A_0 + B_0) · A_1 + B_1) …) · A_{r−1} + B_{r−1}

then runs (or corrects) its piece from S_in(r). Rank-to-rank latency is one all-gather instead of
P−1 hops. Used by ``parallel.context.CPPrefixDeltaNet`` (cp_mode="prefix") for DeltaNet and
Gated DeltaNet, whose summaries come from their WY chunk form (models/ops/delta_rule/chunk.py
``delta_rule_summary``); TTT, Titans and LaCT are not affine, so ``parallelize`` refuses
cp_mode="prefix" for them. Also tested on a token-loop DeltaNet in tests/parallel.

Shapes: A [..., dk, dk], B [..., dv, dk], S_0 [..., dv, dk] (any leading batch/head dims).
Gradients flow to every rank's (A, B) and to S_0 (the all-gather's backward is an all-reduce +
slice, which also works on gloo — it has no reduce_scatter).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import ParallelDims


def _fold(S, As, Bs, upto: int):
    for j in range(upto):
        S = combine(S, As[j], Bs[j])
    return S


def combine(S: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The state after a piece with summary (A, B): S · A + B."""
    return S @ A + B


def _gather(x, dims):
    parts = [torch.empty_like(x) for _ in range(dims.cp)]
    dist.all_gather(parts, x.detach().contiguous(), group=dims.cp_group)
    return torch.stack(parts)


class _PrefixState(torch.autograd.Function):
    """forward: all-gather (A, B), fold ranks < r into S0. backward: every rank differentiates its
    fold w.r.t. all gathered summaries, one all-reduce sums them, each rank keeps its own slot.
    (One Function, so that rank 0 — whose fold uses no summary — still joins the all-reduce.)"""

    @staticmethod
    def forward(ctx, A, B, S0, dummy, dims):
        As, Bs = _gather(A, dims), _gather(B, dims)
        ctx.save_for_backward(As, Bs, S0)
        ctx.dims = dims
        return _fold(S0, As, Bs, dims.cp_rank)

    @staticmethod
    def backward(ctx, g):
        As, Bs, S0 = ctx.saved_tensors
        dims = ctx.dims
        with torch.enable_grad():
            As, Bs, S0 = (t.detach().requires_grad_() for t in (As, Bs, S0))
            S = _fold(S0, As, Bs, dims.cp_rank)
            gA, gB, gS0 = torch.autograd.grad(S, (As, Bs, S0), g, allow_unused=True)
        gA = torch.zeros_like(As) if gA is None else gA
        gB = torch.zeros_like(Bs) if gB is None else gB
        flat = torch.cat([gA.reshape(-1), gB.reshape(-1)])
        dist.all_reduce(flat, group=dims.cp_group)
        gA, gB = flat.split([gA.numel(), gB.numel()])
        r = dims.cp_rank
        return gA.view_as(As)[r], gB.view_as(Bs)[r], gS0, None, None


def prefix_state(A: torch.Tensor, B: torch.Tensor, S0: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This CP rank's incoming state from every rank's (A, B) and the sequence's initial S0.
    Collective over the CP group in forward and in backward."""
    if dims.cp == 1:
        return S0
    # a leaf that requires grad: every rank's output is in the graph, so every rank joins the
    # backward all-reduce even where its own (A, B, S0) need no gradient (frozen, last rank)
    dummy = torch.zeros((), device=A.device, requires_grad=torch.is_grad_enabled())
    return _PrefixState.apply(A, B, S0, dummy, dims)
