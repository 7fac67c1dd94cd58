"""Two-dimensional context parallelism (``cp_mode="2d"``): heads × sequence.

The CP group of P = P_h × P_s ranks is split in two (parallel/groups.py, megatron's hierarchical CP
groups): CP rank c = s·P_h + h is head rank h of *head group* s (P_h consecutive CP ranks, inside a
node) and sequence rank s of *sequence group* h. Token order: as in every cp_mode, CP rank c holds
the contiguous piece c of T/P tokens (``cp_slice``), so head group s holds the contiguous chunk s
of T/P_s tokens, its P_h pieces in order. Per memory layer, rank (h, s):

    prepare on its piece, all local heads     [B, H, T/P, ·]   halo (conv tails, window cache) from CP rank c−1
    ──all-to-all over head group s──▶          [B, H/P_h, T/P_s, ·]   heads h·H/P_h … of chunk s
    state of those heads from (h, s−1) ──▶ scan of chunk s ──▶ its state to (h, s+1)
    ──all-to-all back──▶                       [B, H, T/P, ·] → output (norms, gate, o_proj)

So the Ulysses all-to-all (parallel/ulysses.py) runs inside each head group and the state-passing
wavefront (parallel/context.py) along each sequence group, on a state of H/P_h heads: the
wavefront is P_s deep instead of P, and each scan covers T/P_s tokens of H/P_h heads (the same work
as T/P tokens of H heads). P_h = 1 is the plain pass, P_s = 1 plain Ulysses. Backward mirrors it:
the all-to-alls are their own transposes, the state gradient goes from (h, s+1) to (h, s).

Written once against the mixer contract (models/state.py) for every layer whose scan runs on any
slice of its heads: its registry entry's ``ScanHeads`` (models/layers/registry.py) says where the heads are
in the scan's inputs and outputs and which parameters the scan reads per head; every state tensor is
[B, H, …]. The scan runs unchanged on the rank's head slice: inputs exchanged (or sliced), the initial
state sliced, the per-head parameters the scan reads swapped for their slice
(``torch.func.functional_call``). A layer whose heads interact in the scan (Titans MAL/MAC, Hope) is
refused before any process group exists (:func:`check_2d_config`). Attention layers beside them keep
their all-gather/halo attention over the whole CP group (the token layout is the same), blocks their
pre-conv halo, packed documents their serial block-state pass (parallel/context.py). Gradients:
per-rank partial sums as for every cp_mode; the initial fast weights' head shard h gets its gradient
on rank (h, 0).
"""
from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn

from .context import KIND_HALO, KIND_HALO_META, CPComm, _on_first_tensor, _wire_dtype, recv_state, send_state
from .groups import ParallelDims
from .ulysses import heads_to_seq, seq_to_heads


def check_2d_config(config, tp: int, cp_heads: int) -> None:
    """cp_mode="2d" for a model configuration (no process group needed): every memory layer's scan runs on
    a head slice (its ``ScanHeads``) and ``cp_heads`` divides its heads per TP rank."""
    from models.layers.registry import layer_spec

    for name in dict.fromkeys(config.mixer_types):
        spec = layer_spec(name)
        if spec.kind == "attention":
            continue
        if isinstance(spec.scan_heads, str):
            raise ValueError(f"cp_mode='2d' runs each memory layer's scan on a slice of its heads; {name}'s heads "
                             f"interact ({spec.scan_heads}): use cp_mode='pass'")
        local = getattr(config, spec.scan_heads.heads) // tp
        if local % cp_heads:
            raise ValueError(f"cp_mode='2d' needs cp_heads ({cp_heads}) to divide the heads per TP rank ({local}) "
                             f"of {name}")


def scan_heads_of(config, layer_type: str, tp: int) -> tuple:
    """(the layer's ``ScanHeads``, its heads per TP rank)."""
    from models.layers.registry import layer_spec

    layout = layer_spec(layer_type).scan_heads
    return layout, getattr(config, layout.heads) // tp


def check_2d(model, dims: ParallelDims) -> None:
    """cp_mode="2d" on the unsharded model: :func:`check_2d_config`, and no inner-loop knobs."""
    from models.common.attention import AttentionLayer

    check_2d_config(model.config, dims.tp, dims.cp_heads)
    base = model.model if hasattr(model, "model") else model
    for block in base.layers:
        m = block.mixer
        if not isinstance(m, AttentionLayer) and getattr(m, "knobs", None) is not None:
            raise ValueError(f"cp_mode='2d' does not take the inner-loop knobs (inner_steps, inner_init_pull, "
                             f"inner_lr_schedule, inner_loss) of {type(m).__name__}: use cp_mode='pass'")


def seq_channel(dims: ParallelDims) -> CPComm:
    """The state-pass channel of 2-D CP: a CPComm over the sequence group (h, s−1) → (h, s) → (h, s+1)."""
    comm = CPComm(dims)
    comm.group, comm.prev, comm.next = dims.cp_seq_group, dims.cp_seq_prev, dims.cp_seq_next
    return comm


# --------------------------------------------------------------------------- trees of scan inputs
def _map(tree, fn, leaf=torch.is_tensor):
    """``tree`` (tuples, lists, dicts) with ``fn`` applied to each leaf (others kept as they are)."""
    if isinstance(tree, dict):
        return {k: _map(v, fn, leaf) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn, leaf) for v in tree)
    return fn(tree) if leaf(tree) else tree


class _Slot(int):
    """Index of a tensor in the packed all-to-all."""


def _to_heads(t: torch.Tensor, axes: str, H: int, what: str) -> torch.Tensor:
    """An exchanged tensor as [B, H, T, k]."""
    if axes == "btc":
        if t.dim() != 3 or t.shape[-1] % H:
            raise ValueError(f"{what} (axes 'btc') has shape {tuple(t.shape)}: not [B, T, C] with C a multiple of {H}")
        return t.unflatten(-1, (H, t.shape[-1] // H)).transpose(1, 2)
    if t.dim() < 3 or t.shape[1] != H:
        raise ValueError(f"{what} (axes 'bht') has shape {tuple(t.shape)}: not [B, {H}, T, …]")
    return t.reshape(*t.shape[:3], -1)


def _from_heads(u: torch.Tensor, axes: str, like: torch.Tensor) -> torch.Tensor:
    if axes == "btc":
        return u.transpose(1, 2).flatten(2)
    return u.reshape(*u.shape[:3], *like.shape[3:])


def _exchange(tensors: list, group, Ph: int, forward: bool) -> list:
    """One all-to-all for all ``[B, H, T, k]`` tensors: sequence → heads (``forward``) or back."""
    if Ph == 1:
        return tensors
    wire = _wire_dtype([t.dtype for t in tensors])
    widths = [t.shape[-1] for t in tensors]
    packed = torch.cat([t.to(wire) for t in tensors], -1)
    packed = (seq_to_heads if forward else heads_to_seq)(packed, group, Ph)
    return [p.to(t.dtype) for p, t in zip(packed.split(widths, -1), tensors)]


def _heads_in(items: tuple, layout, H: int, heads: slice, group, Ph: int, name: str) -> tuple:
    """The scan inputs of this rank's heads over its head group's chunk."""
    axes = layout.inputs or ("bht",) * len(items)
    if not set(axes) <= {"bht", "btc", "bh", "h"} or not set(layout.outputs) <= {"bht", "btc"}:
        raise ValueError(f"{name}: its ScanHeads (models/layers/registry.py) has axes {layout.inputs} → {layout.outputs}; "
                         "inputs take 'bht', 'btc', 'bh' or 'h', outputs 'bht' or 'btc'")
    if len(axes) != len(items):
        raise ValueError(f"{name}: its ScanHeads (models/layers/registry.py) names {len(axes)} scan inputs, prepare gives "
                         f"{len(items)}")
    moved, like, kinds = [], [], []

    def take(ax, i):
        def fn(t):
            what = f"{name}'s scan input {i}"
            if ax == "bh":
                return t[:, heads]
            if ax == "h":
                return t[heads]
            moved.append(_to_heads(t, ax, H, what))
            like.append(t)
            kinds.append(ax)
            return _Slot(len(moved) - 1)
        return fn

    marked = tuple(_map(item, take(ax, i)) for i, (item, ax) in enumerate(zip(items, axes)))
    if not moved:
        return marked
    got = _exchange(moved, group, Ph, True)
    return _map(marked, lambda s: _from_heads(got[s], kinds[s], like[s]), leaf=lambda v: isinstance(v, _Slot))


def _heads_out(outputs, layout, hp: int, group, Ph: int):
    """The scan outputs (``hp`` heads over the head group's chunk) back in sequence layout: all local
    heads over the rank's piece."""
    single = torch.is_tensor(outputs)
    items = (outputs,) if single else tuple(outputs)
    axes = layout.outputs or ("bht",) * len(items)
    moved = [_to_heads(t, ax, hp, f"scan output {i}") for i, (t, ax) in enumerate(zip(items, axes))]
    back = [_from_heads(u, ax, t) for u, ax, t in zip(_exchange(moved, group, Ph, False), axes, items)]
    return back[0] if single else type(outputs)(back)


class _Scan(nn.Module):
    """``mixer.scan`` as a module call, for ``torch.func.functional_call`` (per-head parameters sliced)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, inputs, state):
        return self.mixer.scan(inputs, state)


class CP2DMixer:
    """Mixin swapped into a memory mixer's class under cp_mode="2d" (module docstring). Set by
    ``parallelize``: ``_cp_comm`` (whole CP group: halos), ``_cp_seq_comm`` (sequence group: the
    state), ``_cp_scan2d`` (the layer's ``ScanHeads``), ``_cp_heads2d`` (its heads per TP rank),
    ``_cp_layer_idx``."""

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("under context parallelism the memory state comes from the previous CP rank; "
                             "pass memory_state=None")
        comm, seq, layout, idx = self._cp_comm, self._cp_seq_comm, self._cp_scan2d, self._cp_layer_idx
        dims = comm.dims
        Ph, H = dims.cp_heads, self._cp_heads2d
        B, T, _ = x.shape
        name = type(self).__mro__[1].__name__
        halo_kinds = (KIND_HALO_META, KIND_HALO)
        if comm.prev is None:
            start = self.init_state(B)
        else:
            start = self.halo_state(B, recv_state(comm, idx, x.device, halo_kinds), dims.cp_rank * T)
        *items, halo = self.prepare(x, start)
        if comm.next is not None:  # anchored on the first input: in backward its wait comes after the all-to-all
            items[0] = send_state(comm, idx, items[0], halo, halo_kinds)
        hp = H // Ph
        heads = slice(dims.cp_head_rank * hp, (dims.cp_head_rank + 1) * hp)
        items = _heads_in(tuple(items), layout, H, heads, dims.cp_head_group, Ph, name)
        if seq.prev is None:
            start = _state_heads(self.init_state(B), H, heads, name)  # position 0 = the first chunk's
        else:
            start = recv_state(seq, idx, x.device)
        outputs, new_state = self._scan2d((*items, halo), start)
        if seq.next is not None:
            rest = dataclasses.replace(new_state, **{g: {} for g in halo})  # the halo went to CP rank c+1
            outputs = _on_first_tensor(outputs, lambda t: send_state(seq, idx, t, rest))
        return self.output(x, _heads_out(outputs, layout, hp, dims.cp_head_group, Ph)), new_state

    def _scan2d(self, inputs, state):
        """``scan`` of this rank's head slice, the per-head parameters it reads sliced (a method of its
        own: parallel/trace.py spans it)."""
        names = [n for n, _ in self.named_parameters() if any(fnmatch.fnmatch(n, p) for p in self._cp_scan2d.params)]
        if not names:
            return self.scan(inputs, state)
        hp = self._cp_heads2d // self._cp_comm.dims.cp_heads
        h = self._cp_comm.dims.cp_head_rank
        params = dict(self.named_parameters())
        sliced = {f"mixer.{n}": params[n][h * hp:(h + 1) * hp] for n in names}
        return torch.func.functional_call(_Scan(self), sliced, (inputs, state), strict=False)


def _state_heads(state, H: int, heads: slice, name: str):
    """The initial state of the heads ``heads`` (every tensor [B, H, …])."""
    def cut(t):
        if t.dim() < 2 or t.shape[1] != H:
            raise ValueError(f"{name}: a state tensor of shape {tuple(t.shape)} is not [B, {H}, …] (cp_mode='2d' "
                             "needs every state tensor per head)")
        return t[:, heads]
    return state.map(cut)
