"""Context parallelism by passing the memory state from rank to rank: a wavefront.

The sequence is cut into P contiguous pieces, one per CP rank. A memory layer is a recurrence
over the sequence, so rank r runs its piece of layer l starting from the state that rank r−1
reached at the end of its piece of layer l:

    forward                                   backward (mirrored)
    rank0: L1 L2 L3 L4 .  .  .                rank0: .  .  .  B4 B3 B2 B1
    rank1: .  L1 L2 L3 L4 .  .                rank1: .  .  B4 B3 B2 B1 .
    rank2: .  .  L1 L2 L3 L4 .                rank2: .  B4 B3 B2 B1 .  .
    rank3: .  .  .  L1 L2 L3 L4               rank3: B4 B3 B2 B1 .  .  .

Each state is sent (``isend``) the moment its layer's scan finishes, so rank r+1 scans layer l
while rank r scans layer l+1; only the scan is serial (bubble (P−1)/(L+P−1) of the scan time),
the projections, norms and MLPs never wait. Three things cross a rank boundary per block:

    pre_conv tail   the last K−1 inputs of the block's causal conv       (halo)
    q/k conv tails  the last K−1 rows of the shared q/k projection       (halo, share_qk only)
    TTT state       fast weights at the last mini-batch boundary + the pending gradient sum

All three use the same two autograd functions over the CP group:

    _RecvPrev   forward: blocking recv from r−1;   backward: isend the gradient back to r−1
    _SendNext   forward: isend to r+1 (identity on an *anchor* activation);
                backward: blocking recv of the gradient from r+1, returned to the sent tensors

The anchor ties the send into the autograd graph at the right spot: the TTT state send is
anchored on the scan output, so in backward the rank waits for rank r+1's state gradient only
right before its own scan backward (after the o_proj/MLP backward of that layer). Gradients of the
parameters are per-rank partial sums; the trainer sums them over DP × CP (``dims.dp_cp_group``).

Rank r's piece starts at position r·T_local: every rank must hold the same number of tokens
(``parallel.loss.cp_slice`` enforces it), any T_local works (mid-mini-batch cuts included).
"""
from __future__ import annotations

import functools
import pickle
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .groups import ParallelDims

KIND_PRE_CONV, KIND_QK_CONV, KIND_STATE, KIND_META = 0, 1, 2, 3
HEADER_BYTES = 1 << 16  # the pickled structure of a generic mixer's state travels in a fixed-size header


# ---------------------------------------------------------------------------------- wire format
def _wire_dtype(dtypes):
    return functools.reduce(torch.promote_types, dtypes)


def _pack(tensors, dtype):
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


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

    def record(self, event: str, tag: int) -> None:
        if self.trace is not None:
            self.trace.append((event, tag // 8, (tag // 2) % 4, time.perf_counter()))

    @staticmethod
    def tag(layer: int, kind: int, backward: bool) -> int:
        return (layer * 4 + kind) * 2 + int(backward)

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
        dist.recv(buf, src=comm.prev, group=comm.group, tag=tag)
        comm.record("recv", tag)
        return tuple(_unpack(buf, templates))

    @staticmethod
    def backward(ctx, *grads):
        comm = ctx.comm
        buf = _pack(grads, ctx.wire)
        comm.keep(dist.isend(buf, dst=comm.prev, group=comm.group, tag=ctx.tag + 1), buf)
        comm.record("send_grad", ctx.tag)
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
        comm.record("send", tag)
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, g_anchor):
        comm = ctx.comm
        n = sum(torch.Size(s).numel() for s, _ in ctx.templates)
        buf = torch.empty(n, dtype=ctx.wire, device=g_anchor.device)
        dist.recv(buf, src=comm.next, group=comm.group, tag=ctx.tag + 1)
        comm.record("recv_grad", ctx.tag)
        comm.queue_flush()
        return (None, None, g_anchor, None, *_unpack(buf, ctx.templates))


# ------------------------------------------------------------------- TTT layer, split in three
# The single-device TTTLayer.forward is prologue → scan → epilogue in one function; CP needs to
# act between them (receive the state just before the scan, send it right after), so the two
# halves are restated here on the same module. tests/parallel checks them against the original.
def ttt_prologue(layer, x: torch.Tensor, conv: dict, position: int):
    """Projections, RoPE and the inner learning rate: everything before the scan.

    Returns q, k, v [B, H, T, d] and lr [B, H, T] in the compute dtype, and the q/k conv tails."""
    from models.modules import apply_interleaved_rope, rope_cos_sin
    from models.ttt import TTTState

    T = x.shape[1]
    q, k, v, new_conv = layer._qkv(x, TTTState(weights={}, conv=conv, position=position))
    q, k, v = (layer._split_heads(t) for t in (q, k, v))
    positions = torch.arange(position, position + T, device=x.device)
    cos, sin = rope_cos_sin(positions % layer.mini_batch_size, layer.head_dim, layer.rope_theta, q.dtype)
    q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
    lr = torch.sigmoid(layer.lr_gate(x)).transpose(1, 2) * (layer.base_lr / layer.head_dim)
    compute = torch.promote_types(x.dtype, torch.float32)
    q, k, v, lr = (t.to(compute) for t in (q, k, v, lr))
    return q, k, v, lr, new_conv


def ttt_scan(layer, weights: dict, pending, q, k, v, lr, position: int, head_slice=slice(None)):
    from models.ttt import SCAN_IMPLS

    compute = q.dtype
    return SCAN_IMPLS[layer.scan_impl](
        layer.inner,
        {n: t.to(compute) for n, t in weights.items()},
        None if pending is None else {n: t.to(compute) for n, t in pending.items()},
        q, k, v, lr,
        layer.token_idx_offset.to(compute),
        layer.ttt_norm_weight[head_slice].to(compute),
        layer.ttt_norm_bias[head_slice].to(compute),
        position,
        layer.mini_batch_size,
        layer.scan_checkpoint_group_size if layer.training else 0,
    )


def ttt_epilogue(layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Post-norm over all heads, optional gate, output projection."""
    out = layer.post_norm(out.to(x.dtype).transpose(1, 2).flatten(2))
    if layer.use_gate:
        out = F.gelu(layer.g_proj(x), approximate="tanh") * out
    return layer.o_proj(out)


def _state_templates(layer, batch: int, position: int, dtype):
    shapes = [(batch, *getattr(layer, n).shape) for n in layer.fast_weight_names]
    n_copies = 2 if position % layer.mini_batch_size else 1  # weights [+ pending]
    return [(torch.Size(s), dtype) for s in shapes] * n_copies


def recv_qk_conv_tails(layer, comm: CPComm, x: torch.Tensor, layer_idx: int) -> dict:
    if not layer.share_qk or comm.prev is None:
        return {}
    width, K = layer.conv_q.weight.shape[0], layer.conv_q.kernel_size
    tmpl = [(torch.Size((x.shape[0], width, K - 1)), x.dtype)] * 2
    tq, tk = comm.recv_prev(tmpl, layer_idx, KIND_QK_CONV, x.device)
    return {"q": tq, "k": tk}


class CPPassTTT:
    """Mixin swapped into a TTTLayer's class: forward with the state passed between CP ranks."""

    def forward(self, x: torch.Tensor, state=None):
        from models.ttt import TTTState

        if state is not None:
            raise ValueError("under context parallelism the memory state comes from the previous CP rank; "
                             "pass memory_state=None")
        comm, idx = self._cp_comm, self._cp_layer_idx
        B, T, _ = x.shape
        position = comm.dims.cp_rank * T
        conv = recv_qk_conv_tails(self, comm, x, idx)
        q, k, v, lr, new_conv = ttt_prologue(self, x, conv, position)
        if new_conv:
            q = comm.send_next(q, [new_conv["q"], new_conv["k"]], idx, KIND_QK_CONV)
        names = self.fast_weight_names
        if comm.prev is None:
            weights, pending = self.init_state(B).weights, None
        else:
            got = comm.recv_prev(_state_templates(self, B, position, q.dtype), idx, KIND_STATE, x.device)
            weights = dict(zip(names, got[: len(names)]))
            pending = dict(zip(names, got[len(names):])) if len(got) > len(names) else None
        out, weights, pending = ttt_scan(self, weights, pending, q, k, v, lr, position)
        sent = [weights[n] for n in names] + ([pending[n] for n in names] if pending is not None else [])
        out = comm.send_next(out, sent, idx, KIND_STATE)
        y = ttt_epilogue(self, x, out)
        return y, TTTState(weights=weights, pending=pending, position=position + T, conv=new_conv)


class CPBlock:
    """Mixin swapped into a MemoryBlock's class: the pre-conv tail is a halo from CP rank r−1."""

    def forward(self, x: torch.Tensor, state=None):
        if state:
            raise ValueError("under context parallelism pass memory_state=None")
        comm, idx = self._cp_comm, self.layer_idx
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


class CPGenericMixer:
    """Mixin for any mixer with the state API ``forward(x, state) -> (y, state)`` (state with
    ``.map``): DeltaNet, Titans, LaCT, sliding-window and full attention. The whole mixer call is
    the serial part (the TTT path narrows it to the scan); the state's structure goes ahead in a
    pickled header (isend, so the sender never waits), then its tensors as one message. For
    attention the state is the key/value cache, so this is the halo exchange of a sliding window
    and, for full attention, a pass-along of all earlier keys/values (exact, O(sequence) memory
    on the last rank)."""

    def forward(self, x: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("under context parallelism the memory state comes from the previous CP rank; "
                             "pass memory_state=None")
        comm, idx = self._cp_comm, self._cp_layer_idx
        incoming = None
        if comm.prev is not None:
            hdr = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            dist.recv(hdr, src=comm.prev, group=comm.group, tag=comm.tag(idx, KIND_META, False))
            spec = _decode(hdr)
            specs = []
            spec.map(lambda s: specs.append(s) or s)
            got = iter(comm.recv_prev([(torch.Size(s.shape), s.dtype) for s in specs], idx, KIND_STATE, x.device))
            incoming = spec.map(lambda s: next(got))
        y, new_state = super().forward(x, incoming)
        if comm.next is not None:
            tensors = []
            spec = new_state.map(lambda t: tensors.append(t) or _Spec(t))
            hdr = _encode(spec)
            comm.keep(dist.isend(hdr, dst=comm.next, group=comm.group, tag=comm.tag(idx, KIND_META, False)), hdr)
            y = comm.send_next(y, tensors, idx, KIND_STATE)
        return y, new_state


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


def apply_cp(model, dims: ParallelDims, mixer_mixin=CPPassTTT) -> CPComm:
    """Makes every block of ``model`` context-parallel, in place; returns the channel.
    TTT mixers get ``mixer_mixin`` (scan-level pass or Ulysses), every other mixer the generic
    state pass."""
    from models.ttt import TTTLayer

    base = model.model if hasattr(model, "model") else model
    comm = CPComm(dims)
    for block in base.layers:
        block._cp_comm = comm
        block.mixer._cp_comm, block.mixer._cp_layer_idx = comm, block.layer_idx
        swap_class(block, CPBlock)
        swap_class(block.mixer, mixer_mixin if isinstance(block.mixer, TTTLayer) else CPGenericMixer)
    return comm
