"""Micro-batch interleaving of the CP wavefront: the fill is paid once per optimizer step.

With gradient accumulation over M micro-batches the plain loop (forward m, backward m, …) drains
the wavefront of ``cp_mode="pass"``/``"2d"`` after every micro-batch: rank 0 waits (P_s−1) scans
for the last rank at each backward. :func:`interleaved_step` runs the M forwards back to back,
then the M backwards, last micro-batch first:

    rank0 │F0│F1│F2│F3│ .  .  .                 . │B3│B2│B1│B0│
    rank1  ↘│F0│F1│F2│F3│ .  .              . │B3│B2│B1│B0│↖
    rank2    ↘│F0│F1│F2│F3│ .          . │B3│B2│B1│B0│↖
    rank3      ↘│F0│F1│F2│F3│ │B3│B2│B1│B0│↖

(each Fm/Bm is the L layers of micro-batch m; the arrows are the per-layer state messages). Rank 0
starts micro-batch m+1 while the states of micro-batch m still travel down the ranks, so the step
takes ``M·serial/P + (P_s−1)·scan`` per direction instead of ``M·(serial/P + (P_s−1)·scan)``.
Gradients are the same sums as the plain loop's (exact; tests/parallel/test_context2d.py).

Costs: every rank holds the activations of all M micro-batches at the end of the forwards (M × one
micro-batch's; the plain loop holds 1 ×), and the sends of the step are waited for only at its end
(their buffers: M × L states). Nothing inside the forwards may synchronise the CP ranks: compute the
loss normaliser (the global token count) before the forwards (``global_counts``), and resolve packed
documents there too (``resolve_documents``: the pre-forward hook would otherwise all-gather per forward).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .context import flush_pending
from .groups import ParallelDims


def _channels(model) -> list:
    found = {}
    for mod in model.modules():
        for name in ("_cp_comm", "_cp_seq_comm"):
            comm = getattr(mod, name, None)
            if comm is not None:
                found[id(comm)] = comm
    return list(found.values())


def _hold() -> None:
    """Replaces a channel's flush while sends are held (they stay in flight until the step ends)."""


@contextlib.contextmanager
def hold_sends(model):
    """Within: the CP channels of ``model`` do not wait for their in-flight sends at each forward
    and at the end of each backward (gloo's isend completes only when the peer receives, so that wait
    would drain the wavefront between micro-batches); on exit every send is waited for."""
    comms = _channels(model)
    for comm in comms:
        comm.flush = _hold
    try:
        yield
    finally:
        for comm in comms:
            del comm.flush
        flush_pending()


def global_counts(labels: Sequence[torch.Tensor], dims: ParallelDims, ignore_index: int = -100) -> torch.Tensor:
    """Counted tokens of each micro-batch summed over DP × CP, [M] float32: one all-reduce, before
    the forwards (a per-micro-batch all-reduce between forwards would synchronise the ranks)."""
    counts = torch.stack([(t != ignore_index).sum() for t in labels]).float()
    if dims.dp * dims.cp > 1:
        dist.all_reduce(counts, group=dims.dp_cp_group)
    return counts


def resolve_documents(doc_ids: Sequence[torch.Tensor | None], dims: ParallelDims) -> list:
    """Packed documents of M micro-batches, resolved as ``parallelize``'s forward pre-hook does
    (this piece's ``doc_starts``, column 0 a start iff the id differs from the last id of rank r−1's
    piece; whether any CP rank's piece holds a start) but with one all-gather and one all-reduce for
    all M before the forwards. Give each as ``model(ids, cp_documents=resolved[m])`` (None: no
    documents)."""
    from models.common.varlen import doc_starts_from_ids

    given = [d for d in doc_ids if d is not None]
    if not given:
        return [None] * len(doc_ids)
    if len(given) != len(doc_ids):
        raise ValueError("give doc_ids for every micro-batch or for none")
    starts = [doc_starts_from_ids(d) for d in doc_ids]
    last = torch.stack([d[:, -1] for d in doc_ids]).contiguous()  # [M, B]
    parts = [torch.empty_like(last) for _ in range(dims.cp)]
    dist.all_gather(parts, last, group=dims.cp_group)
    if dims.cp_rank > 0:
        for m, (s, d) in enumerate(zip(starts, doc_ids)):
            s[:, 0] = d[:, 0] != parts[dims.cp_rank - 1][m]
    flags = torch.stack([s.any() for s in starts]).to(torch.float32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=dims.cp_group)
    return [(s.cpu(), bool(f)) for s, f in zip(starts, flags.tolist())]


def interleaved_step(model, micro_batches: Sequence, forward: Callable, backward: Callable | None = None) -> list:
    """Forwards of all ``micro_batches`` back to back, then their backwards, last first.

    ``forward(micro_batch) -> loss`` (a scalar tensor: what the plain loop would call backward on);
    ``backward(loss, m)``: defaults to ``loss.backward()`` (a DeepSpeed trainer passes
    ``engine.backward`` then ``engine.step``). Returns the M losses, detached."""
    with hold_sends(model):
        losses = [forward(mb) for mb in micro_batches]
        for m in reversed(range(len(losses))):
            if backward is None:
                losses[m].backward()
            else:
                backward(losses[m], m)
    return [loss.detach() for loss in losses]
