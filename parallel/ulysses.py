"""Head-parallel context parallelism (DeepSpeed-Ulysses style) around the memory layer.

Projections run on the rank's sequence piece for all (local) heads; one all-to-all turns
"all heads, T/P tokens" into "H/P heads, all T tokens"; each rank scans the whole sequence for
its heads from the initial state (no serial chain at all); a second all-to-all turns the result
back before the post-norm and output projection:

    [B, H, T/P, d] ──all-to-all──▶ [B, H/P, T, d] ──scan──▶ [B, H/P, T, d] ──all-to-all──▶ [B, H, T/P, d]

Needs CP ≤ heads/TP (CP must divide the local heads). Costs two all-to-alls of the activations
per layer instead of a state pass; the per-head parameters are sliced to the rank's heads, so
their gradients live on one CP rank each and the usual sum over CP completes them. The q/k conv
tails (share_qk) and the pre-conv tails are halos from the previous rank, as in the pass mode.
The memory state a layer returns is the rank's head group at the end of the full sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .context import KIND_HALO, CPComm, recv_qk_conv_tails


def _all_to_all(x: torch.Tensor, split_dim: int, cat_dim: int, group, world: int) -> torch.Tensor:
    ins = [c.contiguous() for c in x.chunk(world, dim=split_dim)]
    outs = [torch.empty_like(ins[0]) for _ in range(world)]
    dist.all_to_all(outs, ins, group=group)
    return torch.cat(outs, dim=cat_dim)


class _SeqToHeads(torch.autograd.Function):
    """[B, H, T/P, ...] (sequence piece) → [B, H/P, T, ...] (head group)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _all_to_all(x, 1, 2, group, world)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, 2, 1, ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _all_to_all(x, 2, 1, group, world)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, 1, 2, ctx.group, ctx.world), None, None


def seq_to_heads(x, group, world):
    return _SeqToHeads.apply(x, group, world)


def heads_to_seq(x, group, world):
    return _HeadsToSeq.apply(x, group, world)


def check_ulysses(num_heads_local: int, cp: int) -> None:
    if num_heads_local % cp:
        raise ValueError(f"ulysses context parallelism needs cp ({cp}) to divide the heads per TP rank "
                         f"({num_heads_local}); use cp_mode='pass' or a smaller cp")


class UlyssesTTT:
    """Mixin swapped into a TTTLayer's class (see :func:`parallel.context.swap_class`)."""

    def forward(self, x: torch.Tensor, state=None):
        from models.layers.ttt import TTTState

        if state is not None:
            raise ValueError("under context parallelism pass memory_state=None")
        comm: CPComm = self._cp_comm
        idx, P, r = self._cp_layer_idx, comm.dims.cp, comm.dims.cp_rank
        B, T, _ = x.shape
        conv = recv_qk_conv_tails(self, comm, x, idx)
        q, k, v, lr, halo = self.prepare(x, TTTState(weights={}, conv=conv, position=r * T))
        new_conv = halo["conv"]
        if new_conv:
            q = comm.send_next(q, [new_conv["q"], new_conv["k"]], idx, KIND_HALO)
        d = q.shape[-1]
        packed = torch.cat([q, k, v, lr.unsqueeze(-1)], dim=-1)  # one all-to-all for all four
        packed = seq_to_heads(packed, comm.group, P)
        q, k, v, lr = packed.split([d, d, d, 1], dim=-1)
        hp = self.num_heads // P
        heads = slice(r * hp, (r + 1) * hp)
        weights = {n: getattr(self, n)[heads].to(q.dtype).unsqueeze(0).expand(B, hp, *getattr(self, n).shape[1:])
                   for n in self.fast_weight_names}
        out, weights, pending = self.scan_from(weights, None, q, k, v, lr.squeeze(-1), 0, heads)
        out = heads_to_seq(out, comm.group, P)
        y = self.output(x, out)
        return y, TTTState(weights=weights, pending=pending, position=P * T, conv=new_conv)
