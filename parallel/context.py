"""Context parallelism by passing the memory state from rank to rank: a wavefront.

The sequence is cut into P contiguous pieces, one per CP rank. A memory layer is a recurrence
over the sequence, so rank r runs its piece of layer l starting from the state that rank r−1
reached at the end of its piece of layer l:

    forward                                   backward (mirrored)
    rank0: L1 L2 L3 L4 .  .  .                rank0: .  .  .  B4 B3 B2 B1
    rank1: .  L1 L2 L3 L4 .  .                rank1: .  .  B4 B3 B2 B1 .
    rank2: .  .  L1 L2 L3 L4 .                rank2: .  B4 B3 B2 B1 .  .
    rank3: .  .  .  L1 L2 L3 L4               rank3: B4 B3 B2 B1 .  .  .

Every memory mixer is prepare → scan → output (models/common/state.py). Each state is sent (``isend``)
the moment its layer's scan finishes, so rank r+1 scans layer l while rank r scans layer l+1; only
the scan is serial (bubble (P−1)/(L+P−1) of the scan time), the projections, norms and MLPs never
wait. Three things cross a rank boundary per block:

    pre_conv tail   the last K−1 inputs of the block's causal conv       (halo)
    mixer halo      what ``prepare`` reads of earlier tokens: conv tails, sliding-window keys/values
    mixer state     the rest of the state ``scan`` leaves: fast weights, pending sums, momentum, …

All three use the same two autograd functions over the CP group:

    _RecvPrev   forward: blocking recv from r−1;   backward: isend the gradient back to r−1
    _SendNext   forward: isend to r+1 (identity on an *anchor* activation);
                backward: blocking recv of the gradient from r+1, returned to the sent tensors

The anchor ties the send into the autograd graph at the right spot: the TTT state send is
anchored on the scan output, so in backward the rank waits for rank r+1's state gradient only
right before its own scan backward (after the o_proj/MLP backward of that layer). The mixer halo
and state are sent with their structure in a pickled header (any family, any state tree). Gradients of the
parameters are per-rank partial sums; the trainer sums them over DP × CP (``dims.dp_cp_group``).

Rank r's piece starts at position r·T_local: every rank must hold the same number of tokens
(``parallel.loss.cp_slice`` enforces it), any T_local works (mid-mini-batch cuts included).
"""
from __future__ import annotations

import dataclasses
import functools
import pickle
import time

import torch
import torch.distributed as dist

from .groups import ParallelDims

KIND_PRE_CONV, KIND_HALO, KIND_STATE, KIND_META, KIND_HALO_META = 0, 1, 2, 3, 4
N_KINDS = 8  # message kinds per layer in a tag
HEADER_BYTES = 1 << 16  # the pickled structure of a generic mixer's state travels in a fixed-size header


# ---------------------------------------------------------------------------------- wire format
def _wire_dtype(dtypes):
    return functools.reduce(torch.promote_types, dtypes)


def _pack(tensors, dtype):
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unpack(flat, templates):
    sizes = [torch.Size(s).numel() for s, _ in templates]
    return [p.view(s).to(d).clone() for p, (s, d) in zip(flat.split(sizes), templates)]


# (work, buffer) of every isend not yet waited for. Module-level on purpose: a send must outlive
# the model that issued it (an eval forward has no backward to flush it; if the model is dropped
# before the neighbour has received, destroying the Work would lose the message and hang it).
_IN_FLIGHT: list = []


def flush_pending() -> None:
    """Waits for every CP send still in flight (done at each CP forward and after backward)."""
    works = list(_IN_FLIGHT)
    _IN_FLIGHT.clear()
    for work, _ in works:
        work.wait()


class CPComm:
    """The CP point-to-point channel of one model: tags, in-flight sends, end-of-backward flush."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims
        self.group = dims.cp_group
        self.prev, self.next = dims.cp_prev, dims.cp_next
        self._dummy = {}
        self._callback_queued = False
        self.trace: list | None = None  # set to [] to record (event, layer, kind, time.perf_counter())
        self.tracer = None  # a parallel.trace.Tracer (attach_tracer): per-rank Chrome-trace timeline

    @property
    def timing(self) -> bool:
        return self.tracer is not None

    def record(self, event: str, tag: int, nbytes: int = 0, t0: float | None = None) -> None:
        """``t0``: when a receive was posted (its wait is [t0, now])."""
        if self.trace is not None:
            self.trace.append((event, tag // (2 * N_KINDS), (tag // 2) % N_KINDS, time.perf_counter()))
        if self.tracer is not None:
            peer = self.next if event in ("send", "recv_grad") else self.prev
            self.tracer.comm(event, tag // (2 * N_KINDS), (tag // 2) % N_KINDS, nbytes, peer, t0)

    @staticmethod
    def tag(layer: int, kind: int, backward: bool) -> int:
        return (layer * N_KINDS + kind) * 2 + int(backward)

    @staticmethod
    def keep(work, buf) -> None:
        _IN_FLIGHT.append((work, buf))

    @staticmethod
    def flush() -> None:
        flush_pending()

    def queue_flush(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.flush()

    def dummy(self, device) -> torch.Tensor:
        """A leaf that requires grad, given to both exchange functions: their backward runs even
        where the exchanged tensors need no gradient (frozen layers), so the two sides of every
        backward exchange always meet (a one-sided send or recv would hang the neighbour)."""
        if device not in self._dummy:
            self._dummy[device] = torch.zeros((), device=device, requires_grad=True)
        d = self._dummy[device]
        return d if torch.is_grad_enabled() else d.detach()

    # ---- the two operations used by the layers
    def recv_prev(self, templates, layer: int, kind: int, device):
        """Tensors of ``templates`` [(shape, dtype)] from CP rank r−1 (gradients flow back)."""
        return _RecvPrev.apply(self, self.tag(layer, kind, False), templates, self.dummy(device))

    def send_next(self, anchor: torch.Tensor, tensors, layer: int, kind: int) -> torch.Tensor:
        """Sends ``tensors`` to CP rank r+1 now; returns ``anchor`` (use it in its place)."""
        if self.next is None:
            return anchor
        return _SendNext.apply(self, self.tag(layer, kind, False), anchor, self.dummy(anchor.device), *tensors)


class _RecvPrev(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, tag, templates, dummy):
        ctx.comm, ctx.tag = comm, tag
        wire = _wire_dtype([d for _, d in templates])
        ctx.wire = wire
        buf = torch.empty(sum(torch.Size(s).numel() for s, _ in templates), dtype=wire, device=dummy.device)
        t0 = time.perf_counter() if comm.timing else None
        dist.recv(buf, src=comm.prev, group=comm.group, tag=tag)
        comm.record("recv", tag, _nbytes(buf), t0)
        return tuple(_unpack(buf, templates))

    @staticmethod
    def backward(ctx, *grads):
        comm = ctx.comm
        buf = _pack(grads, ctx.wire)
        comm.keep(dist.isend(buf, dst=comm.prev, group=comm.group, tag=ctx.tag + 1), buf)
        comm.record("send_grad", ctx.tag, _nbytes(buf))
        comm.queue_flush()
        return None, None, None, None


class _SendNext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, tag, anchor, dummy, *tensors):
        ctx.comm, ctx.tag = comm, tag
        ctx.templates = [(t.shape, t.dtype) for t in tensors]
        ctx.wire = _wire_dtype([t.dtype for t in tensors])
        buf = _pack(tensors, ctx.wire)
        comm.keep(dist.isend(buf, dst=comm.next, group=comm.group, tag=tag), buf)
        comm.record("send", tag, _nbytes(buf))
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, g_anchor):
        comm = ctx.comm
        n = sum(torch.Size(s).numel() for s, _ in ctx.templates)
        buf = torch.empty(n, dtype=ctx.wire, device=g_anchor.device)
        t0 = time.perf_counter() if comm.timing else None
        dist.recv(buf, src=comm.next, group=comm.group, tag=ctx.tag + 1)
        comm.record("recv_grad", ctx.tag, _nbytes(buf), t0)
        comm.queue_flush()
        return (None, None, g_anchor, None, *_unpack(buf, ctx.templates))


def recv_qk_conv_tails(layer, comm: CPComm, x: torch.Tensor, layer_idx: int) -> dict:
    """TTT's shared q/k conv tails from CP rank r−1 (Ulysses: fixed shapes, no header)."""
    if not layer.share_qk or comm.prev is None:
        return {}
    width, K = layer.conv_q.weight.shape[0], layer.conv_q.kernel_size
    tmpl = [(torch.Size((x.shape[0], width, K - 1)), x.dtype)] * 2
    tq, tk = comm.recv_prev(tmpl, layer_idx, KIND_HALO, x.device)
    return {"q": tq, "k": tk}


class CPBlock:
    """Mixin swapped into a MemoryBlock's class: the pre-conv tail is a halo from CP rank r−1.

    Packed documents (``comm.varlen``, set per forward when any CP rank's piece holds a document
    start): the block's whole sequence part (pre-conv + mixer, its plain single-device forward)
    runs on the rank's documents as models/common/varlen.py does, from the block state received from
    rank r−1 (pickled structure + tensors, as the mixer state); a row whose piece starts a document at
    some column ignores that state from there on, and the state sent on reflects only the row's
    current document. The narrower exchanges (scan-level state, halos, all-gather attention)
    cannot restart mid-piece, so they are used only when no piece has a start."""

    def forward(self, x: torch.Tensor, state=None, doc_starts=None, need_state: bool = True):
        if state:
            raise ValueError("under context parallelism pass memory_state=None")
        comm, idx = self._cp_comm, self.layer_idx
        if getattr(comm, "varlen", False):
            return self._varlen_forward(x, doc_starts)
        new_state = {}
        if self.pre_conv is not None:
            tail = None
            if comm.prev is not None:
                conv = self.pre_conv.conv
                dtype = torch.promote_types(self.pre_conv.norm.weight.dtype, x.dtype)
                tmpl = [(torch.Size((x.shape[0], x.shape[2], conv.kernel_size - 1)), dtype)]
                (tail,) = comm.recv_prev(tmpl, idx, KIND_PRE_CONV, x.device)
            y, new_state["pre_conv"] = self.pre_conv(x, tail)
            y = comm.send_next(y, [new_state["pre_conv"]], idx, KIND_PRE_CONV)
            x = x + y
        y, new_state["mixer"] = self.mixer(self.mixer_norm(x))
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_state

    def _local_mix(self, x: torch.Tensor, state=None):
        """MemoryBlock.mix with the mixer's own single-device forward (no CP exchange inside)."""
        state = state or {}
        new_state = {}
        if self.pre_conv is not None:
            y, new_state["pre_conv"] = self.pre_conv(x, state.get("pre_conv"))
            x = x + y
        m = self.mixer
        y, new_state["mixer"] = m._cp_base_cls.forward(m, self.mixer_norm(x), state.get("mixer"))
        return x + y, new_state

    def _varlen_forward(self, x: torch.Tensor, doc_starts):
        from models.common.varlen import needs_segments, run_segments

        comm, idx = self._cp_comm, self.layer_idx
        need = comm.next is not None
        if doc_starts is not None and bool(doc_starts.any()):
            # the segments that start fresh run before the receive (they do not need it)
            incoming = (lambda: recv_state(comm, idx, x.device)) if comm.prev is not None else None
            x, new_state = run_segments(self._local_mix, x, doc_starts, incoming, need_state=need)
        else:
            incoming = recv_state(comm, idx, x.device) if comm.prev is not None else None
            if needs_segments(None, incoming):  # rows of rank r−1 at different positions
                starts = torch.zeros(x.shape[:2], dtype=torch.bool)
                x, new_state = run_segments(self._local_mix, x, starts, incoming, need_state=need)
            else:
                x, new_state = self._local_mix(x, incoming)
        if comm.next is not None:
            x = send_state(comm, idx, x, new_state)
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_state


class _Spec:
    """Placeholder for a tensor in a state's pickled structure."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = tuple(t.shape), t.dtype


def _encode(obj) -> torch.Tensor:
    data = pickle.dumps(obj)
    if len(data) > HEADER_BYTES - 8:
        raise ValueError(f"state structure of {len(data)} bytes does not fit the {HEADER_BYTES}-byte CP header")
    buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor):
    n = int(buf[:8].view(torch.int64).item())
    return pickle.loads(bytes(buf[8 : 8 + n].tolist()))


def _map(tree, fn):
    from models.common.state import map_tree

    return map_tree(tree, fn)


def recv_state(comm: CPComm, idx: int, device, kinds=(KIND_META, KIND_STATE)):
    """A state of any structure from CP rank r−1: its pickled structure, then its tensors
    (``kinds``: the header's and the tensors' message kinds)."""
    meta, kind = kinds
    hdr = torch.empty(HEADER_BYTES, dtype=torch.uint8)
    t0 = time.perf_counter() if comm.timing else None
    dist.recv(hdr, src=comm.prev, group=comm.group, tag=comm.tag(idx, meta, False))
    if comm.timing:
        comm.record("recv", comm.tag(idx, meta, False), HEADER_BYTES, t0)
    spec = _decode(hdr)
    specs = []
    _map(spec, lambda s: specs.append(s) or s)
    if not specs:
        return spec
    got = iter(comm.recv_prev([(torch.Size(s.shape), s.dtype) for s in specs], idx, kind, device))
    return _map(spec, lambda s: next(got))


def send_state(comm: CPComm, idx: int, anchor: torch.Tensor, state, kinds=(KIND_META, KIND_STATE)) -> torch.Tensor:
    """Sends ``state`` to CP rank r+1 (structure header, then tensors); returns ``anchor``."""
    meta, kind = kinds
    tensors = []
    spec = _map(state, lambda t: tensors.append(t) or _Spec(t))
    hdr = _encode(spec)
    comm.keep(dist.isend(hdr, dst=comm.next, group=comm.group, tag=comm.tag(idx, meta, False)), hdr)
    if comm.timing:
        comm.record("send", comm.tag(idx, meta, False), HEADER_BYTES)
    return comm.send_next(anchor, tensors, idx, kind) if tensors else anchor


def _on_first_tensor(tree, fn):
    """``tree`` (a tensor or a tuple) with ``fn`` applied to its first top-level tensor."""
    if torch.is_tensor(tree):
        return fn(tree)
    i = next(i for i, t in enumerate(tree) if torch.is_tensor(t))
    return (*tree[:i], fn(tree[i]), *tree[i + 1:])


class CPPassMixer:
    """Mixin for every mixer of the contract (models/common/state.py) under cp_mode="pass":

        [recv halo from r−1] → prepare → [isend halo to r+1] → [recv state from r−1] → scan
        → [isend state to r+1] → output

    The halo (``prepare``'s last item: conv tails, sliding-window keys/values) leaves as soon as
    the projections are done, so the next rank's ``prepare`` does not wait for this rank's scan;
    only the scan is in the serial chain. Both travel with their structure in a pickled header
    (isend, so the sender never waits). The halo send is anchored on ``prepare``'s first tensor,
    the state send on the scan's output: in backward a rank waits for r+1's state gradient only
    right before its own scan backward, and for the halo gradient right before its prepare
    backward."""

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("under context parallelism the memory state comes from the previous CP rank; "
                             "pass memory_state=None")
        comm, idx = self._cp_comm, self._cp_layer_idx
        B, T, _ = x.shape
        halo_kinds = (KIND_HALO_META, KIND_HALO)
        if comm.prev is None:
            start = self.init_state(B)
        else:
            start = self.halo_state(B, recv_state(comm, idx, x.device, halo_kinds), comm.dims.cp_rank * T)
        inputs = self.prepare(x, start)
        halo = inputs[-1]
        if comm.next is not None:
            inputs = (send_state(comm, idx, inputs[0], halo, halo_kinds), *inputs[1:])
        if comm.prev is not None:
            start = recv_state(comm, idx, x.device)
        outputs, new_state = self.scan(inputs, start)
        if comm.next is not None:
            rest = dataclasses.replace(new_state, **{g: {} for g in halo})  # the halo has gone already
            outputs = _on_first_tensor(outputs, lambda t: send_state(comm, idx, t, rest))
        return self.output(x, outputs), new_state


def scan_checkpointing_ignored(model) -> list[str]:
    """The mixer classes whose scan checkpointing (``Mixer.checkpoint_tokens`` > 0) CP bypasses:
    ``CPPassMixer`` calls prepare / scan / output itself, so each rank keeps its whole scan graph
    (TTT's groups inside its scan still apply)."""
    return sorted({type(m).__mro__[2].__name__ for m in model.modules()
                   if isinstance(m, CPPassMixer) and getattr(m, "checkpoint_tokens", 0)})


_SWAPPED: dict = {}


def swap_class(module, mixin) -> None:
    """module.__class__ ← a subclass of (mixin, original class), as FSDP2's fully_shard does."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    key = (mixin, cls)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _SWAPPED[key]


class _AllGatherSeq(torch.autograd.Function):
    """[B, H, T/P, d] pieces → [B, H, T, d] over the CP group. Backward: the gradient of the whole
    is summed over ranks and each keeps its slice (a reduce-scatter; gloo has none, so all-reduce +
    slice). ``dummy`` (requires grad) makes every rank run the backward collective."""

    @staticmethod
    def forward(ctx, x, dummy, dims):
        ctx.dims = dims
        parts = [torch.empty_like(x) for _ in range(dims.cp)]
        dist.all_gather(parts, x.detach().contiguous(), group=dims.cp_group)
        return torch.cat(parts, 2)

    @staticmethod
    def backward(ctx, g):
        dims = ctx.dims
        g = g.contiguous().clone()
        dist.all_reduce(g, group=dims.cp_group)
        return g.chunk(dims.cp, 2)[dims.cp_rank], None, None


def all_gather_seq(x: torch.Tensor, comm: CPComm) -> torch.Tensor:
    return _AllGatherSeq.apply(x, comm.dummy(x.device), comm.dims)


class CPAttention:
    """Mixin for AttentionLayer under CP — no serial chain:

    * full attention (window None, or window − 1 longer than a piece): keys/values of every rank
      all-gathered (one collective, k and v packed), queries of rank r attend causally over
      positions < (r+1)·T; backward: the gathered gradient is summed and sliced (reduce-scatter).
    * sliding window w with w − 1 ≤ T: the halo — the last w − 1 keys/values (after RoPE) go to
      rank r+1 as soon as they are projected (isend); rank r receives the previous rank's.
    """

    def forward(self, x: torch.Tensor, state=None):
        from models.common.attention import windowed_attention
        from models.common.state import LayerState

        if state is not None:
            raise ValueError("under context parallelism pass memory_state=None")
        comm, idx = self._cp_comm, self._cp_layer_idx
        r = comm.dims.cp_rank
        B, T, _ = x.shape
        position = r * T
        q, k, v = self.project(x, position)
        pk, pv = self.prefix(B, q.dtype)
        w = self.window
        if w is None or w - 1 > T:
            d = k.shape[-1]
            kv = all_gather_seq(torch.cat([k, v], -1), comm)[:, :, : (r + 1) * T]
            k_ctx, v_ctx = kv[..., :d], kv[..., d:]
            k_start = 0
        else:
            halo = w - 1
            k_ctx, v_ctx, k_start = k, v, position
            if halo and comm.prev is not None:
                tmpl = [(torch.Size((B, k.shape[1], halo, k.shape[-1])), k.dtype)] * 2
                hk, hv = comm.recv_prev(tmpl, idx, KIND_STATE, x.device)
                k_ctx, v_ctx, k_start = torch.cat([hk, k], 2), torch.cat([hv, v], 2), position - halo
            if halo and comm.next is not None:
                # anchored on q: in backward the rank waits for r+1's halo gradient only after its
                # own attention backward
                q = comm.send_next(q, [k[:, :, T - halo:], v[:, :, T - halo:]], idx, KIND_STATE)
        o = windowed_attention(q, k_ctx, v_ctx, position, k_start, w, pk, pv, self.block_size)
        keep = k_ctx.shape[2] if w is None else min(k_ctx.shape[2], w - 1)
        cache = {"k": k_ctx[:, :, k_ctx.shape[2] - keep:], "v": v_ctx[:, :, v_ctx.shape[2] - keep:]}
        y = self.o_proj(o.transpose(1, 2).flatten(2))
        return y, LayerState(cache=cache, position=position + T)


class CPPrefixDeltaNet:
    """Mixin for DeltaNetLayer under cp_mode="prefix": no serial chain.

    Rank r projects its piece (the short convs' K−1-token tails are a halo from r−1), summarises
    it as S_out = A_r S_in + B_r from its own tokens (fp32, the WY chunk form:
    ``DeltaNetLayer.summary``), all-gathers the summaries, folds those of ranks < r into its
    incoming state (parallel/prefix.py) and runs its piece from there. Backward: autograd through
    the fold; the gathered summaries' gradients are summed over CP (prefix.py)."""

    def forward(self, x: torch.Tensor, state=None):
        from models.ops.delta_rule.chunk import delta_rule_prepare, delta_rule_run, delta_rule_summary
        from models.common.state import LayerState

        from .prefix import prefix_state

        if state is not None:
            raise ValueError("under context parallelism pass memory_state=None")
        comm, idx, dims = self._cp_comm, self._cp_layer_idx, self._cp_comm.dims
        B, T, _ = x.shape
        position = dims.cp_rank * T
        conv_in = {}
        if comm.prev is not None:
            width, K = self.conv_q.weight.shape[0], self.conv_q.kernel_size
            got = comm.recv_prev([(torch.Size((B, width, K - 1)), x.dtype)] * 3, idx, KIND_HALO, x.device)
            conv_in = dict(zip("qkv", got))
        q, k, v, beta, log_alpha, halo = self.prepare(x, LayerState(conv=conv_in, position=position))
        conv = halo["conv"]
        H, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
        # the WY chunk tensors (the triangular solves) serve both the summary and the run
        prep = delta_rule_prepare(q, k, v, beta, log_alpha, self.chunk_size) if self.scan_impl == "chunk" else None
        if comm.next is None:  # nobody folds the last piece: its summary is not computed
            A, Bm = q.new_zeros(B, H, dk, dk), q.new_zeros(B, H, dk, dv)
        else:
            A, Bm = delta_rule_summary(prep) if prep is not None else self.summary(q, k, v, beta, log_alpha)
            # the conv halo is anchored on A: in backward this rank waits for r+1's conv-tail
            # gradient only after the (collective) prefix backward, as rank r+1 does
            A = comm.send_next(A, [conv["q"], conv["k"], conv["v"]], idx, KIND_HALO)
        S0 = q.new_zeros(B, H, dk, dv)
        # prefix.py composes S·A + B (row convention); here S_out = A S + B: transpose
        S_in = prefix_state(A.mT, Bm.mT, S0.mT, dims).mT
        o, S = delta_rule_run(prep, S_in) if prep is not None else self.run(q, k, v, beta, log_alpha, S_in)
        return self.output(x, o), LayerState(weights={"S": S}, conv=conv, position=position + T)
