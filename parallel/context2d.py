"""Two-dimensional context parallelism (``cp_mode="2d"``): heads × sequence.

The CP group of P = P_h × P_s ranks is split in two (parallel/groups.py, megatron's hierarchical CP
groups): CP rank c = s·P_h + h is head rank h of *head group* s (P_h consecutive CP ranks, inside a
node) and sequence rank s of *sequence group* h. Token order: as in every cp_mode, CP rank c holds
the contiguous piece c of T/P tokens (``cp_slice``), so head group s holds the contiguous chunk s
of T/P_s tokens, its P_h pieces in order. Per memory layer, rank (h, s):

    prepare on its piece, all local heads     [B, H, T/P, ·]   conv tails: halo from CP rank c−1
    ──all-to-all over head group s──▶          [B, H/P_h, T/P_s, ·]   heads h·H/P_h … of chunk s
    state of those heads from (h, s−1) ──▶ scan of chunk s ──▶ its state to (h, s+1)
    ──all-to-all back──▶                       [B, H, T/P, ·] → output (post-norm, gate, o_proj)

So the Ulysses all-to-all (parallel/ulysses.py) runs inside each head group and the state-passing
wavefront (parallel/context.py) along each sequence group, on a state of H/P_h heads: the
wavefront is P_s deep instead of P, and each scan covers T/P_s tokens of H/P_h heads (the same work
as T/P tokens of H heads). P_h = 1 is the plain pass, P_s = 1 plain Ulysses. Backward mirrors it:
the all-to-alls are their own transposes, the state gradient goes from (h, s+1) to (h, s).

Written against the layer steps ``prepare → scan → output`` through a small adapter per step
signature (:func:`scan_adapter`: TTT-Linear/MLP, DeltaNet/Gated DeltaNet); the scan must treat heads
independently. Attention layers beside them keep their all-gather/halo attention over the whole CP
group (the token layout is the same), blocks their pre-conv halo, packed documents their serial
block-state pass (parallel/context.py). Gradients: per-rank partial sums as for every cp_mode; the
initial fast weights' head shard h gets its gradient on rank (h, 0).
"""
from __future__ import annotations

import torch

from .context import KIND_HALO, KIND_STATE, CPComm
from .groups import ParallelDims
from .ulysses import heads_to_seq, seq_to_heads


class _TTTScan:
    """TTT-Linear/MLP: prepare(x, TTTState) → (q, k, v, lr, halo); scan_from(weights, pending, …, heads)."""

    halo = staticmethod(lambda layer: ["q", "k"] if layer.share_qk else [])

    @staticmethod
    def prepare(layer, x, conv, position):
        from models.layers.ttt import TTTState

        q, k, v, lr, halo = layer.prepare(x, TTTState(weights={}, conv=conv, position=position))
        return [q, k, v, lr.unsqueeze(-1)], halo["conv"]

    @staticmethod
    def initial(layer, B, heads, dtype):
        return [getattr(layer, n)[heads].to(dtype).unsqueeze(0).expand(B, *getattr(layer, n)[heads].shape)
                for n in layer.fast_weight_names]

    @staticmethod
    def templates(layer, B, hp, position, dtype):
        shapes = [torch.Size((B, hp, *getattr(layer, n).shape[1:])) for n in layer.fast_weight_names]
        return [(s, dtype) for s in shapes] * (2 if position % layer.mini_batch_size else 1)  # weights [+ pending]

    @staticmethod
    def scan(layer, inputs, state, position, heads):
        names = layer.fast_weight_names
        q, k, v, lr = inputs
        weights = dict(zip(names, state[: len(names)]))
        pending = dict(zip(names, state[len(names):])) if len(state) > len(names) else None
        out, weights, pending = layer.scan_from(weights, pending, q, k, v, lr.squeeze(-1), position, heads)
        return out, [weights[n] for n in names] + ([pending[n] for n in names] if pending is not None else [])

    @staticmethod
    def state(layer, state, conv, position):
        from models.layers.ttt import TTTState

        names = layer.fast_weight_names
        pending = dict(zip(names, state[len(names):])) if len(state) > len(names) else None
        return TTTState(weights=dict(zip(names, state)), pending=pending, position=position, conv=conv)


class _DeltaScan:
    """DeltaNet / Gated DeltaNet: prepare(x, LayerState) → (q, k, v, β, log α, halo); run(…, S)."""

    halo = staticmethod(lambda layer: ["q", "k", "v"])

    @staticmethod
    def prepare(layer, x, conv, position):
        from models.common.state import LayerState

        q, k, v, beta, log_alpha, halo = layer.prepare(x, LayerState(conv=conv, position=position))
        return [q, k, v, beta.unsqueeze(-1)] + ([] if log_alpha is None else [log_alpha.unsqueeze(-1)]), halo["conv"]

    @staticmethod
    def initial(layer, B, heads, dtype):
        hp = len(range(layer.num_heads)[heads])
        return [torch.zeros(B, hp, layer.head_dim, layer.head_dim, dtype=dtype, device=layer.q_proj.weight.device)]

    @staticmethod
    def templates(layer, B, hp, position, dtype):
        return [(torch.Size((B, hp, layer.head_dim, layer.head_dim)), dtype)]

    @staticmethod
    def scan(layer, inputs, state, position, heads):
        q, k, v, beta = inputs[:4]
        log_alpha = inputs[4].squeeze(-1) if len(inputs) > 4 else None
        o, S = layer.run(q, k, v, beta.squeeze(-1), log_alpha, state[0])
        return o, [S]

    @staticmethod
    def state(layer, state, conv, position):
        from models.common.state import LayerState

        return LayerState(weights={"S": state[0]}, conv=conv, position=position)


def _scan_adapters() -> dict:
    from models.layers.deltanet import DeltaNetLayer
    from models.layers.ttt import TTTLayer

    return {TTTLayer: _TTTScan, DeltaNetLayer: _DeltaScan}


def scan_adapter(mixer):
    """The 2-D adapter of ``mixer`` (None where its family has none)."""
    return next((a for cls, a in _scan_adapters().items() if isinstance(mixer, cls)), None)


def check_2d(model, dims: ParallelDims) -> None:
    """cp_mode="2d": every non-attention mixer has an adapter, P_h divides its heads per TP rank, no
    knobs (called on the unsharded model)."""
    from models.common.attention import AttentionLayer

    base = model.model if hasattr(model, "model") else model
    for block in base.layers:
        m = block.mixer
        if isinstance(m, AttentionLayer):
            continue
        if scan_adapter(m) is None:
            raise ValueError(f"cp_mode='2d' needs a memory layer with prepare/scan/output over independent heads "
                             f"(TTT-Linear/MLP, DeltaNet, Gated DeltaNet); {type(m).__name__} has none: use cp_mode='pass'")
        if getattr(m, "knobs", None) is not None:
            raise ValueError(f"cp_mode='2d' does not take the inner-loop knobs (inner_steps, inner_init_pull, "
                             f"inner_lr_schedule, inner_loss) of {type(m).__name__}: use cp_mode='pass'")
        local = m.num_heads // dims.tp  # parallelize checks before TP shards the layer
        if local % dims.cp_heads:
            raise ValueError(f"cp_mode='2d' needs cp_heads ({dims.cp_heads}) to divide the heads per TP rank "
                             f"({local}) of {type(m).__name__}")


def seq_channel(dims: ParallelDims) -> CPComm:
    """The state-pass channel of 2-D CP: a CPComm over the sequence group (h, s−1) → (h, s) → (h, s+1)."""
    comm = CPComm(dims)
    comm.group, comm.prev, comm.next = dims.cp_seq_group, dims.cp_seq_prev, dims.cp_seq_next
    return comm


class CP2DMixer:
    """Mixin swapped into a memory mixer's class under cp_mode="2d" (module docstring). Set by
    ``parallelize``: ``_cp_comm`` (whole CP group: conv halos), ``_cp_seq_comm`` (sequence group:
    the state), ``_cp_scan2d`` (the family's adapter), ``_cp_layer_idx``."""

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("under context parallelism the memory state comes from the previous CP rank; "
                             "pass memory_state=None")
        comm, seq, fam, idx = self._cp_comm, self._cp_seq_comm, self._cp_scan2d, self._cp_layer_idx
        dims = comm.dims
        Ph, h, s = dims.cp_heads, dims.cp_head_rank, dims.cp_seq_rank
        B, T, _ = x.shape
        conv = {}
        names = fam.halo(self)
        if names and comm.prev is not None:
            convs = [getattr(self, f"conv_{n}") for n in names]
            tmpl = [(torch.Size((B, c.weight.shape[0], c.kernel_size - 1)), x.dtype) for c in convs]
            conv = dict(zip(names, comm.recv_prev(tmpl, idx, KIND_HALO, x.device)))
        inputs, new_conv = fam.prepare(self, x, conv, dims.cp_rank * T)
        if names:  # anchored on q: in backward the wait for c+1's tail gradient comes after the all-to-all
            inputs[0] = comm.send_next(inputs[0], [new_conv[n] for n in names], idx, KIND_HALO)
        widths = [t.shape[-1] for t in inputs]
        packed = torch.cat(inputs, dim=-1)  # one all-to-all for all per-head inputs
        if Ph > 1:
            packed = seq_to_heads(packed, dims.cp_head_group, Ph)
        inputs = list(packed.split(widths, dim=-1))
        hp = self.num_heads // Ph
        heads = slice(h * hp, (h + 1) * hp)
        position = s * Ph * T  # the first token of chunk s
        dtype = inputs[0].dtype
        if seq.prev is None:
            st = fam.initial(self, B, heads, dtype)
        else:
            st = list(seq.recv_prev(fam.templates(self, B, hp, position, dtype), idx, KIND_STATE, x.device))
        out, st = self._scan2d(inputs, st, position, heads)
        out = seq.send_next(out, st, idx, KIND_STATE)
        if Ph > 1:
            out = heads_to_seq(out, dims.cp_head_group, Ph)
        return self.output(x, out), fam.state(self, st, new_conv, position + Ph * T)

    def _scan2d(self, inputs, state, position: int, heads: slice):
        """This rank's head group scanned from ``state`` (a method of its own: parallel/trace.py spans it)."""
        return self._cp_scan2d.scan(self, inputs, state, position, heads)
