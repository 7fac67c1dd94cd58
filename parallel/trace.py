"""Per-rank timelines of a (context-parallel) model as Chrome-trace JSON (chrome://tracing, Perfetto).

    tracer = attach_tracer(model, rank)      # after parallelize(); installs hooks from outside
    ... forward / backward steps ...         # tracer.step_span("forward", t0, t1) for your own spans
    tracer.save("trace/rank0.json")          # one file per rank (temp name, then rename)
    merge_traces(["trace/rank0.json", ...], "trace/trace.json")   # one timeline, a row per rank
    detach_tracer(model)

Recorded per rank (pid = rank; tid 0 compute, tid 1 communication; times in µs of the machine's
monotonic clock, the same for every process of one machine):

    L{l} block      / L{l} block.bwd     a block's forward / backward
    L{l} scan       / L{l} scan.bwd      the serial part: the mixer's ``scan`` (models/common/state.py);
                                         an attention layer's own forward
    L{l} mlp        / L{l} mlp.bwd       the block's MLP
    send/recv {state,pre_conv,halo,meta,halo_meta} L{l} [grad]
                                         each point-to-point exchange of parallel/context.py with its
                                         bytes and peer; a receive spans its wait (start: posted, end:
                                         data there), a send is an instant (isend)

Nothing is recorded, and nothing is installed, unless a tracer is attached: the models and the CP
classes carry no tracing code (the CP channel calls ``comm.tracer`` only when it is set). Backward
spans come from identity autograd functions placed around the traced parts (their backward runs
when the gradient reaches them).
"""
from __future__ import annotations

import json
import os
import time

import torch

KIND_NAMES = {0: "pre_conv", 1: "halo", 2: "state", 3: "meta", 4: "halo_meta"}
COMPUTE, COMM = 0, 1


def now() -> float:
    return time.perf_counter()


class Tracer:
    """Chrome-trace events of one rank."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.events: list[dict] = []
        self._open: dict = {}

    def span(self, name: str, t0: float, t1: float, cat: str = "compute", tid: int = COMPUTE, **args) -> None:
        self.events.append(dict(name=name, cat=cat, ph="X", ts=t0 * 1e6, dur=max(t1 - t0, 0.0) * 1e6,
                                pid=self.rank, tid=tid, args=args))

    def instant(self, name: str, t: float, cat: str = "comm", tid: int = COMM, **args) -> None:
        self.events.append(dict(name=name, cat=cat, ph="i", s="t", ts=t * 1e6, pid=self.rank, tid=tid, args=args))

    def step_span(self, name: str, t0: float, t1: float, **args) -> None:
        """A span of the caller's own (forward, backward, step), on a row of its own."""
        self.span(name, t0, t1, cat="step", tid=2, **args)

    # ---- backward spans: begin when the gradient reaches the outputs, end when it reaches the inputs
    def bwd_begin(self, key) -> None:
        self._open[key] = now()

    def bwd_end(self, key, name: str, **args) -> None:
        t0 = self._open.pop(key, None)
        if t0 is not None:
            self.span(name, t0, now(), **args)

    # ---- called by parallel.context.CPComm.record when comm.tracer is set
    def comm(self, event: str, layer: int, kind: int, nbytes: int, peer, t0: float | None) -> None:
        grad = event.endswith("_grad")
        name = f"{event.split('_')[0]} {KIND_NAMES.get(kind, kind)} L{layer}" + (" grad" if grad else "")
        args = dict(layer=layer, kind=KIND_NAMES.get(kind, kind), bytes=int(nbytes), peer=peer,
                    direction="bwd" if grad else "fwd")
        t = now()
        if event.startswith("recv"):
            self.span(name, t if t0 is None else t0, t, cat="comm", tid=COMM, **args)
        else:
            self.instant(name, t, **args)

    def trace(self) -> dict:
        meta = [dict(name="process_name", ph="M", pid=self.rank, args=dict(name=f"rank {self.rank}"))]
        meta += [dict(name="thread_name", ph="M", pid=self.rank, tid=t, args=dict(name=n))
                 for t, n in ((COMPUTE, "compute"), (COMM, "p2p"), (2, "step"))]
        return dict(traceEvents=meta + self.events, displayTimeUnit="ms")

    def save(self, path: str) -> str:
        _write_json(self.trace(), path)
        return path


def _write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def merge_traces(paths, out: str) -> str:
    """One Chrome trace of all ranks (each file's pid is its rank)."""
    events = []
    for p in paths:
        with open(p) as fh:
            events += json.load(fh)["traceEvents"]
    _write_json(dict(traceEvents=events, displayTimeUnit="ms"), out)
    return out


def load_events(path: str) -> list[dict]:
    """The non-metadata events of a trace file."""
    with open(path) as fh:
        return [e for e in json.load(fh)["traceEvents"] if e.get("ph") != "M"]


# ------------------------------------------------------------------------------ the hooks
class _Mark(torch.autograd.Function):
    """Identity; its backward calls ``fn`` (once, when the gradients of all its inputs are ready)."""

    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs):
        ctx.fn()
        return (None, *gs)


def _mark(fn, *xs):
    """xs (tensors) through :class:`_Mark` when autograd records them; else unchanged."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return xs
    return _Mark.apply(fn, *xs)


def _bwd_pair(tracer: Tracer, name: str, layer: int):
    key = (name, layer)
    return (lambda: tracer.bwd_begin(key)), (lambda: tracer.bwd_end(key, f"L{layer} {name}.bwd", layer=layer))


def _wrap_module(module, tracer: Tracer, name: str, layer: int):
    """Forward span of ``module`` and, through marks on its first input and output, its backward span."""
    begin, end = _bwd_pair(tracer, name, layer)
    t0 = {}

    def pre(mod, args):
        t0["t"] = now()
        if args and isinstance(args[0], torch.Tensor):
            (x,) = _mark(end, args[0])
            return (x, *args[1:])
        return None

    def post(mod, args, out):
        tracer.span(f"L{layer} {name}", t0.pop("t", now()), now(), layer=layer)
        if isinstance(out, torch.Tensor):
            return _mark(begin, out)[0]
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (_mark(begin, out[0])[0], *out[1:])
        return None

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _traced_scan(layer, tracer: Tracer, idx: int, name: str = "scan"):
    """The mixer's ``scan(inputs, state)`` (models/common/state.py; under 2-D CP ``_scan2d(inputs, state, …)``)
    with a span around it (forward) and marks on its top-level input and output tensors (backward)."""
    scan = getattr(type(layer), name)
    begin, end = _bwd_pair(tracer, "scan", idx)

    def marked(items, fn):
        if torch.is_tensor(items):
            return _mark(fn, items)[0]
        at = [i for i, t in enumerate(items) if torch.is_tensor(t)]
        items = list(items)
        for i, t in zip(at, _mark(fn, *(items[i] for i in at))):
            items[i] = t
        return tuple(items)

    def traced(inputs, *rest):
        inputs = marked(inputs, end)
        t0 = now()
        out, state = scan(layer, inputs, *rest)
        tracer.span(f"L{idx} scan", t0, now(), layer=idx)
        return marked(out, begin), state

    return traced


class _ScanSpan:
    """Placed in an attention layer's class between its CP mixin and its own class: its own forward
    becomes the scan span (attention has no prepare/scan split)."""

    def forward(self, x, state=None):
        tracer, idx = self._trace_tracer, self._trace_idx
        begin, end = _bwd_pair(tracer, "scan", idx)
        (x,) = _mark(end, x)
        t0 = now()
        y, st = super().forward(x, state)
        tracer.span(f"L{idx} scan", t0, now(), layer=idx)
        return _mark(begin, y)[0], st


def attach_tracer(model, rank: int | None = None) -> Tracer:
    """Installs the recorder on ``model`` (plain or parallelized) and returns it."""
    from models.common.state import Mixer

    if getattr(model, "_tracer", None) is not None:
        raise ValueError("a tracer is already attached to this model")
    if rank is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tracer = Tracer(rank)
    base = model.model if hasattr(model, "model") else model
    handles, undo = [], []
    for i, block in enumerate(base.layers):
        idx = getattr(block, "layer_idx", i)
        handles += _wrap_module(block, tracer, "block", idx)
        handles += _wrap_module(block.mlp, tracer, "mlp", idx)
        m = block.mixer
        if isinstance(m, Mixer):
            name = "_scan2d" if hasattr(m, "_cp_scan2d") else "scan"
            setattr(m, name, _traced_scan(m, tracer, idx, name))
            undo.append(lambda m=m, name=name: m.__dict__.pop(name, None))
        else:  # attention: its own forward
            cls = type(m)
            own = getattr(m, "_cp_base_cls", cls)
            bases = (_ScanSpan, own) if cls is own else (cls.__bases__[0], _ScanSpan, own)
            m._trace_tracer, m._trace_idx = tracer, idx
            m.__class__ = type(f"Traced{cls.__name__}", bases, {})
            undo.append(lambda m=m, cls=cls: setattr(m, "__class__", cls))
    # the CP channel, and under cp_mode="2d" the sequence groups' state channel (parallel/context2d.py)
    comms = {id(c): c for c in [getattr(model, "_cp_comm", None)]
             + [getattr(b.mixer, "_cp_seq_comm", None) for b in base.layers] if c is not None}
    for comm in comms.values():
        comm.tracer = tracer
        undo.append(lambda comm=comm: setattr(comm, "tracer", None))
    model._tracer = tracer
    model._tracer_undo = (handles, undo)
    return tracer


def detach_tracer(model) -> None:
    handles, undo = model._tracer_undo
    for h in handles:
        h.remove()
    for fn in undo:
        fn()
    model._tracer = None
