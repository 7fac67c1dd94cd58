"""A discrete-event simulator of context-parallel training steps: per rank, per layer, per message.

    python -m bench.cp_sim --costs costs.json --layers 24 --heads 32 --seq 131072 --P 8 32 128
    python -m bench.cp_sim --calibrate --layer ttt_linear --layers 4 --hidden 256 --seq 8192 --json out.json
    python -m bench.cp_sim --calibrate-block --preset 1b --layer ttt_mlp --seq 1024 --out costs_1b.json
    python -m bench.cp_sim --costs costs_1b.json --table --plot docs/cp_sim.png     # docs/parallelism.md

The model. Each rank runs a *program*, a list of operations in the order the code issues them:
compute (a duration), send (non-blocking: the message is there ``latency + bytes/bandwidth`` later),
receive (blocks until the message is there) and collectives (all-to-all, all-gather, all-reduce:
every member waits for the last one, then pays the collective's cost). The simulator advances
every rank as far as its program allows until all have finished; the step time is the last
rank's end. A layer's compute is three parts, each ``tokens × seconds-per-token`` (``Costs``):

    pre    everything before the serial part (pre-conv, norm, the mixer's ``prepare``)
    scan   the serial part: the mixer's ``scan`` (models/common/state.py)
    post   everything after it (the mixer's ``output``, the residual, the MLP)

plus the embedding/LM head/loss once per micro-batch, each with its own backward cost. Schedules
(``P = P_h × P_s`` ranks, ``T`` tokens, ``L`` layers, ``M`` micro-batches per step):

    pass        the state-passing wavefront (P_h = 1): rank s receives layer l's state from s−1
                before its scan, sends it to s+1 after; backward mirrored (parallel/context.py)
    ulysses     P_s = 1: two all-to-alls per layer (q,k,v,lr in; the scan output back), each rank
                scans H/P heads over the whole sequence from the initial state (parallel/ulysses.py)
    2d          Ulysses within head groups of P_h consecutive ranks, the wavefront of each head
                shard along its sequence group (state of H/P_h heads; rank (h, s) = s·P_h + h):
                pre → all-to-all in → recv state → scan → send state → all-to-all out → post,
                backward mirrored (parallel/context2d.py; the order is checked against a traced
                2 × 2 gloo run in tests/parallel/test_context2d.py). With M > 1: interleaved
    interleaved the wavefront over M micro-batches: every rank runs the M forwards back to back,
                then the M backwards (last first), so the fill (P−1)·scan is paid once per step
                instead of once per micro-batch (parallel/interleave.py, ``--cp-interleave``).
                Memory: a rank holds the activations of all M micro-batches at the end of the
                forwards (M × one micro-batch's; the plain pass with gradient accumulation holds 1 ×)
    prefix      affine layers (DeltaNet family, parallel/prefix.py): every rank summarises its piece
                (summary ≈ ``summary`` × its scan), all-gathers the summaries, folds, scans; backward
                all-reduces the P summaries' gradients. No serial chain, one collective per layer

Closed forms it reproduces (tests/parallel/test_cp_sim.py): P = 1 is the serial sum of the costs;
the pass schedule's forward is the serial time/P plus the fill (P−1)·scan(T/P) when
scan ≤ pre + post (docs/parallelism.md: efficiency L/(L+(P−1)·f) with f the scan share).

Not modelled: compute/communication overlap inside a kernel, the gradient all-reduce over DP×CP
(the same for every schedule, overlapped with backward by DDP/DeepSpeed buckets), memory limits,
per-operation launch overheads (``--op-overhead`` adds a fixed cost per compute op).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

SCHEDULES = ("pass", "ulysses", "2d", "interleaved", "prefix")
HALO_BYTES = 1 << 16  # a halo message: parallel/context.py's fixed-size structure header (+ the conv tails)


# ------------------------------------------------------------------------------- inputs
@dataclass
class Costs:
    """Seconds per token of one layer with all its heads on one rank (forward ``_f``, backward
    ``_b``), and the bytes that cross ranks."""

    pre_f: float
    pre_b: float
    scan_f: float
    scan_b: float
    post_f: float
    post_b: float
    head_f: float = 0.0
    head_b: float = 0.0
    state_bytes: float = 0.0      # one layer's memory state, all heads, one sequence
    a2a_in_bytes: float = 0.0     # per token: Ulysses' q, k, v, lr (all heads)
    a2a_out_bytes: float = 0.0    # per token: Ulysses' scan output (all heads)
    summary: float = 1.0          # prefix: the summary's cost as a fraction of the scan
    heads: int = 1                # the heads the costs were measured with (for 2d / ulysses divisibility)
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "Costs":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cp_sim: cannot read costs file {path}: {e}") from None
        d = d.get("costs", d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SystemExit(f"cp_sim: unknown fields in {path}: {sorted(unknown)}")
        return cls(**d)

    def block(self) -> float:
        """Seconds per token of one layer, forward + backward."""
        return self.pre_f + self.pre_b + self.scan_f + self.scan_b + self.post_f + self.post_b

    def scan_share(self) -> float:
        return (self.scan_f + self.scan_b) / self.block()


@dataclass
class Link:
    """Point-to-point and collective costs: ``latency + bytes/bandwidth``, intra-node (ranks r
    and r' with r // node_size == r' // node_size) or inter-node."""

    latency: float = 10e-6
    bandwidth: float = 150e9       # bytes/s per direction (NVLink-class)
    inter_latency: float = 20e-6
    inter_bandwidth: float = 25e9  # bytes/s (200 Gb/s InfiniBand)
    node_size: int = 8

    def _lb(self, ranks) -> tuple[float, float]:
        nodes = {r // self.node_size for r in ranks}
        return (self.latency, self.bandwidth) if len(nodes) == 1 else (self.inter_latency, self.inter_bandwidth)

    def p2p(self, src: int, dst: int, nbytes: float) -> float:
        lat, bw = self._lb((src, dst))
        return lat + nbytes / bw

    def all_to_all(self, members, nbytes: float) -> float:
        """Each member holds ``nbytes`` and keeps 1/k of it (pairwise exchange)."""
        k = len(members)
        lat, bw = self._lb(members)
        return (k - 1) * lat + nbytes * (k - 1) / k / bw

    def all_gather(self, members, nbytes: float) -> float:
        """Each member contributes ``nbytes`` (ring)."""
        k = len(members)
        lat, bw = self._lb(members)
        return (k - 1) * (lat + nbytes / bw)

    def all_reduce(self, members, nbytes: float) -> float:
        """A buffer of ``nbytes`` summed over the members (ring)."""
        k = len(members)
        lat, bw = self._lb(members)
        return 2 * (k - 1) * lat + 2 * (k - 1) / k * nbytes / bw


# ---------------------------------------------------------------------------- the engine
@dataclass
class Event:
    name: str
    t0: float
    t1: float
    kind: str       # compute | send | recv | coll
    args: dict


def simulate(programs: list[list[tuple]], link: Link) -> list[list[Event]]:
    """Runs the programs; returns each rank's events in program order. Operations:

    ("c", name, seconds, args)                      compute
    ("s", name, key, dst, nbytes, args)             isend (returns at once)
    ("r", name, key, args)                          blocking receive of ``key``
    ("x", name, key, members, seconds, args)        collective of ``members`` (ranks), then ``seconds``
    """
    P = len(programs)
    pc, now = [0] * P, [0.0] * P
    events: list[list[Event]] = [[] for _ in range(P)]
    arrival: dict = {}
    colls: dict = {}
    while True:
        moved = False
        for r in range(P):
            prog = programs[r]
            while pc[r] < len(prog):
                op = prog[pc[r]]
                t = now[r]
                if op[0] == "c":
                    _, name, dur, args = op
                    events[r].append(Event(name, t, t + dur, "compute", args))
                    now[r] = t + dur
                elif op[0] == "s":
                    _, name, key, dst, nbytes, args = op
                    arrival[key] = t + link.p2p(r, dst, nbytes)
                    events[r].append(Event(name, t, t, "send", dict(args, bytes=nbytes, peer=dst)))
                elif op[0] == "r":
                    _, name, key, args = op
                    if key not in arrival:
                        break
                    now[r] = max(t, arrival[key])
                    events[r].append(Event(name, t, now[r], "recv", args))
                elif op[0] == "x":
                    _, name, key, members, dur, args = op
                    got = colls.setdefault(key, {})
                    got.setdefault(r, t)
                    if len(got) < len(members):
                        break
                    now[r] = max(got.values()) + dur
                    events[r].append(Event(name, t, now[r], "coll", args))
                else:
                    raise ValueError(f"unknown operation {op[0]!r}")
                pc[r] += 1
                moved = True
        if all(pc[r] == len(programs[r]) for r in range(P)):
            return events
        if not moved:
            stuck = {r: programs[r][pc[r]][1] for r in range(P) if pc[r] < len(programs[r])}
            raise RuntimeError(f"simulated schedule deadlocks: {stuck}")


# ------------------------------------------------------------------------------ schedules
@dataclass
class Setup:
    """What is simulated: ``T`` tokens of one sequence per micro-batch, ``L`` layers, ``heads``."""

    T: int
    L: int
    heads: int
    P_h: int = 1
    P_s: int = 1
    M: int = 1
    schedule: str = "pass"
    op_overhead: float = 0.0
    halo: bool = False  # the mixer's halo goes CP rank r−1 → r after prepare (its gradient back before prepare's backward)

    @property
    def P(self) -> int:
        return self.P_h * self.P_s


def layout(schedule: str, P: int, heads: int, P_h: int | None = None, M: int = 1) -> tuple[int, int, int]:
    """(P_h, P_s, M) of a schedule at P ranks; clear errors where it cannot run."""
    if schedule in ("pass", "prefix"):
        return 1, P, 1
    if schedule == "interleaved":
        return 1, P, M
    if schedule == "ulysses":
        if heads % P:
            raise ValueError(f"ulysses needs P ({P}) to divide the heads ({heads})")
        return P, 1, 1
    if schedule == "2d":
        if P_h is None or P % P_h or heads % P_h:
            raise ValueError(f"2d needs P_h dividing P ({P}) and the heads ({heads}); got P_h={P_h}")
        return P_h, P // P_h, M
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def programs(c: Costs, s: Setup, link: Link) -> list[list[tuple]]:
    if s.schedule == "prefix":
        return _prefix_programs(c, s, link)
    return _wavefront_programs(c, s, link)


def _wavefront_programs(c: Costs, s: Setup, link: Link) -> list[list[tuple]]:
    """pass / ulysses / 2d / interleaved: Ulysses over P_h, the state pass over P_s."""
    Ph, Ps, M, L = s.P_h, s.P_s, s.M, s.L
    n = s.T / s.P  # tokens of one rank (the scan covers T/P_s tokens of H/P_h heads: the same work)
    oh = s.op_overhead

    def rank(h, q):
        return q * Ph + h

    progs = []
    for q in range(Ps):
        for h in range(Ph):
            r = rank(h, q)
            grp = [rank(j, q) for j in range(Ph)]
            a_in = link.all_to_all(grp, c.a2a_in_bytes * n) if Ph > 1 else 0.0
            a_out = link.all_to_all(grp, c.a2a_out_bytes * n) if Ph > 1 else 0.0
            st = c.state_bytes / Ph
            p = []

            def comp(name, per_token, **a):
                p.append(("c", name, per_token * n + oh, a))

            halo = s.halo and Ph * Ps > 1 and s.schedule != "ulysses"
            for m in range(M):
                for l in range(L):
                    a = dict(layer=l, mb=m)
                    if halo and r > 0:  # prepare reads the halo of CP rank r−1 (parallel/context.py)
                        p.append(("r", f"recv halo L{l}", ("halo", m, l, r), a))
                    comp(f"L{l} pre", c.pre_f, **a)
                    if halo and r < Ph * Ps - 1:
                        p.append(("s", f"send halo L{l}", ("halo", m, l, r + 1), r + 1, HALO_BYTES, a))
                    if Ph > 1:
                        p.append(("x", f"all_to_all in L{l}", ("a2a_in", m, l, q), grp, a_in, a))
                    if q > 0:
                        p.append(("r", f"recv state L{l}", ("state", m, l, h, q), a))
                    comp(f"L{l} scan", c.scan_f, **a)
                    if q < Ps - 1:
                        p.append(("s", f"send state L{l}", ("state", m, l, h, q + 1), rank(h, q + 1), st, a))
                    if Ph > 1:
                        p.append(("x", f"all_to_all out L{l}", ("a2a_out", m, l, q), grp, a_out, a))
                    comp(f"L{l} post", c.post_f, **a)
                comp("head", c.head_f, mb=m)
            for m in reversed(range(M)):
                comp("head.bwd", c.head_b, mb=m)
                for l in reversed(range(L)):
                    a = dict(layer=l, mb=m)
                    comp(f"L{l} post.bwd", c.post_b, **a)
                    if Ph > 1:
                        p.append(("x", f"all_to_all out.bwd L{l}", ("a2a_out_b", m, l, q), grp, a_out, a))
                    if q < Ps - 1:
                        p.append(("r", f"recv state L{l} grad", ("grad", m, l, h, q), a))
                    comp(f"L{l} scan.bwd", c.scan_b, **a)
                    if q > 0:
                        p.append(("s", f"send state L{l} grad", ("grad", m, l, h, q - 1), rank(h, q - 1), st, a))
                    if Ph > 1:
                        p.append(("x", f"all_to_all in.bwd L{l}", ("a2a_in_b", m, l, q), grp, a_in, a))
                    if halo and r < Ph * Ps - 1:  # the halo's gradient from r+1, before prepare's backward
                        p.append(("r", f"recv halo L{l} grad", ("halo_g", m, l, r), a))
                    comp(f"L{l} pre.bwd", c.pre_b, **a)
                    if halo and r > 0:
                        p.append(("s", f"send halo L{l} grad", ("halo_g", m, l, r - 1), r - 1, HALO_BYTES, a))
            progs.append((r, p))
    return [p for _, p in sorted(progs, key=lambda rp: rp[0])]


def _prefix_programs(c: Costs, s: Setup, link: Link) -> list[list[tuple]]:
    """Affine layers: summary → all-gather (A, B) → fold → scan; backward all-reduces the
    gathered summaries' gradients (parallel/prefix.py). The last rank computes no summary."""
    P, L, n, oh = s.P, s.L, s.T / s.P, s.op_overhead
    grp = list(range(P))
    ag = link.all_gather(grp, 2 * c.state_bytes) if P > 1 else 0.0   # (A, B): about twice the state
    ar = link.all_reduce(grp, 2 * c.state_bytes * P) if P > 1 else 0.0
    progs = []
    for r in range(P):
        p = []
        last = r == P - 1 or P == 1
        for l in range(L):
            a = dict(layer=l)
            p.append(("c", f"L{l} pre", c.pre_f * n + oh, a))
            if not last:
                p.append(("c", f"L{l} summary", c.summary * c.scan_f * n + oh, a))
            if P > 1:
                p.append(("x", f"all_gather L{l}", ("ag", l), grp, ag, a))
            p.append(("c", f"L{l} scan", c.scan_f * n + oh, a))
            p.append(("c", f"L{l} post", c.post_f * n + oh, a))
        p.append(("c", "head", c.head_f * n + oh, {}))
        p.append(("c", "head.bwd", c.head_b * n + oh, {}))
        for l in reversed(range(L)):
            a = dict(layer=l)
            p.append(("c", f"L{l} post.bwd", c.post_b * n + oh, a))
            p.append(("c", f"L{l} scan.bwd", c.scan_b * n + oh, a))
            if P > 1:
                p.append(("x", f"all_reduce L{l}", ("ar", l), grp, ar, a))
            if not last:
                p.append(("c", f"L{l} summary.bwd", c.summary * c.scan_b * n + oh, a))
            p.append(("c", f"L{l} pre.bwd", c.pre_b * n + oh, a))
        progs.append(p)
    return progs


# ------------------------------------------------------------------------------- results
@dataclass
class Prediction:
    schedule: str
    P: int
    P_h: int
    P_s: int
    M: int
    step: float          # seconds per step (M micro-batches)
    serial: float        # the same work on one rank
    efficiency: float    # serial / (P · step)
    bubble: float        # share of rank-time idle
    extra_activation: float  # activation memory vs one micro-batch in flight (interleaved: M)


def predict(c: Costs, s: Setup, link: Link, events: bool = False):
    ev = simulate(programs(c, s, link), link)
    step = max(e[-1].t1 for e in ev if e)
    serial_setup = dataclasses.replace(s, P_h=1, P_s=1, schedule="pass")
    serial = max(e[-1].t1 for e in simulate(programs(c, serial_setup, link), link))
    busy = sum(e.t1 - e.t0 for r in ev for e in r if e.kind == "compute")
    pred = Prediction(s.schedule, s.P, s.P_h, s.P_s, s.M, step, serial, serial / (s.P * step),
                      1 - busy / (s.P * step), float(s.M))  # M micro-batches in flight
    return (pred, ev) if events else pred


def best_2d(c: Costs, T: int, L: int, heads: int, P: int, link: Link, M: int = 1) -> Prediction:
    """The 2-D layout P_h × P_s with the highest predicted efficiency (P_h dividing P and the heads)."""
    best = None
    for Ph in range(1, P + 1):
        if P % Ph or heads % Ph:
            continue
        pr = predict(c, Setup(T, L, heads, Ph, P // Ph, M, "2d"), link)
        if best is None or pr.efficiency > best.efficiency:
            best = pr
    return best


def closed_form_pass(c: Costs, T: int, L: int, P: int) -> float:
    """docs/parallelism.md: a step takes (L + (P−1)·f)/L of the ideal 1/P, f the scan share
    (exact when the scan is no longer than pre + post and communication is free)."""
    return L / (L + (P - 1) * c.scan_share())


def to_chrome(events: list[list[Event]]) -> dict:
    """Simulated timelines in the trace format of parallel/trace.py (µs)."""
    out = []
    for r, evs in enumerate(events):
        for e in evs:
            tid = 0 if e.kind == "compute" else 1
            if e.kind == "send":
                out.append(dict(name=e.name, ph="i", s="t", ts=e.t0 * 1e6, pid=r, tid=tid, args=e.args))
            else:
                out.append(dict(name=e.name, ph="X", ts=e.t0 * 1e6, dur=(e.t1 - e.t0) * 1e6, pid=r, tid=tid,
                                args=e.args))
    return dict(traceEvents=out, displayTimeUnit="ms")


# ------------------------------------------------------------------------- event orders
def order_of_sim(events: list[Event]) -> list[str]:
    """A rank's scan starts and state sends/receives, forward and backward, in program order."""
    return [e.name for e in events if _ordered(e.name)]


def order_of_trace(trace_events: list[dict]) -> list[str]:
    """The same from a recorded trace (parallel/trace.py) of one rank: scans by their start, sends
    at their time, receives when the data was there (the end of their wait)."""
    keyed = []
    for e in trace_events:
        if e.get("ph") == "M" or not _ordered(e["name"]):
            continue
        name = e["name"]
        t = e["ts"] + (e.get("dur", 0.0) if name.startswith("recv") else 0.0)
        tie = 0 if name.startswith("recv") else 2 if name.startswith("send") else 1  # equal times: program order
        keyed.append((round(t, 3), tie, name))  # ns: the rounding of ts + dur must not reorder ties
    return [n for _, _, n in sorted(keyed)]


def _ordered(name: str) -> bool:
    parts = name.split()
    if len(parts) == 2 and parts[1] in ("scan", "scan.bwd"):
        return True
    return len(parts) >= 3 and parts[0] in ("send", "recv") and parts[1] == "state"


# ---------------------------------------------------------------------------- calibration
def _timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_block(args, n: int, repeats: int = 3) -> Costs:
    """Per-token costs of one block of ``args``' model at ``n`` tokens (this process, its threads):
    pre / scan / post / head, forward and backward, each timed on its own (best of ``repeats``)."""
    import torch
    import torch.nn.functional as F

    from bench.cp import build

    torch.manual_seed(0)
    model = build(args).train()
    block, base = model.model.layers[0], model.model
    mixer = block.mixer
    C = block.mixer_norm.weight.shape[0]
    x = torch.randn(1, n, C, requires_grad=True)

    def tensors(tree):
        return [t for t in (tree if isinstance(tree, (tuple, list)) else [tree]) if isinstance(t, torch.Tensor)]

    def pre():  # everything before the scan: pre-conv, norm, the mixer's prepare (models/common/state.py)
        h = x
        if block.pre_conv is not None:
            h = h + block.pre_conv(x, None)[0]
        xn = block.mixer_norm(h)
        return h, xn, mixer.prepare(xn, mixer.init_state(1))

    h, xn, ins = pre()
    ins = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in ins)

    def scan():
        return mixer.scan(ins, mixer.init_state(1))[0]

    out = scan()
    out = tuple(t.detach().requires_grad_() for t in out) if isinstance(out, tuple) else out.detach().requires_grad_()
    hd, xnd = h.detach().requires_grad_(), xn.detach().requires_grad_()

    def post():
        y = hd + mixer.output(xnd, out)
        return y + block.mlp(block.mlp_norm(y))

    ids = torch.randint(0, args.vocab, (1, n))

    def head():
        e = base.embed_tokens(ids)
        logits = model.lm_head(base.norm(e))
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    def fb(f, outs):
        outs = [o for o in tensors(outs) if o.requires_grad]
        return torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    t = {}
    for name, f in (("pre", lambda: tensors(pre()[2])), ("scan", scan), ("post", post), ("head", head)):
        t[name + "_f"] = t[name + "_b"] = math.inf
        for _ in range(repeats):  # each repeat times its forward and then its backward: no difference of two
            t0 = time.perf_counter()  # noisy timings (that went negative under load: a zero backward)
            outs = f()
            t1 = time.perf_counter()
            fb(f, outs)
            t2 = time.perf_counter()
            t[name + "_f"], t[name + "_b"] = min(t[name + "_f"], t1 - t0), min(t[name + "_b"], t2 - t1)
    heads = mixer.num_heads if hasattr(mixer, "num_heads") else args.heads
    state = sum(s.numel() * s.element_size() for s in _state_tensors(mixer, scan_state(mixer, ins)))
    per_tok = {k: max(v, 0.0) / n for k, v in t.items()}
    return Costs(**per_tok, state_bytes=float(state), a2a_in_bytes=float((3 * C + heads) * 4),
                 a2a_out_bytes=float(C * 4), heads=heads, meta=dict(tokens=n, layer=args.layer, hidden=C))


def scan_state(mixer, ins):
    """The state a scan leaves (what the pass schedule sends), without the halo."""
    import dataclasses

    import torch

    with torch.no_grad():
        state = mixer.scan(ins, mixer.init_state(1))[1]
    return dataclasses.replace(state, **{g: {} for g in ins[-1]})


def _state_tensors(mixer, state) -> list:
    import torch

    found = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif o is not None and hasattr(o, "__dict__"):
            walk(vars(o))

    walk(state)
    return found


def _pingpong(n_floats: int, repeats: int = 20) -> tuple[float, float]:
    """(latency, bandwidth) between CP ranks 0 and 1 of the default group (half round trips)."""
    import torch
    import torch.distributed as dist

    r = dist.get_rank()
    res = []
    for size in (1, n_floats):
        buf = torch.zeros(size)
        dist.barrier()
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            if r == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            best = min(best, (time.perf_counter() - t) / 2)
        res.append(best)
    lat = res[0]
    bw = n_floats * 4 / max(res[1] - lat, 1e-9)
    return lat, bw


def calibrate_worker(args, cp: int):
    """One rank of a calibration run: the CP=cp step times, interleaved with timings of one block
    at this rank's token count (so machine load affects both alike), and the gloo link (cp=2)."""
    import torch.distributed as dist

    from bench.cp import save_trace, setup

    model, step = setup(args, cp)
    n = args.seq // cp
    step()  # warm-up
    steps, costs = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t)
        if cp > 1:
            dist.barrier()  # every rank times its block at once: the load is that of the CP run
        costs.append(measure_block(args, n, repeats=1))
    link = _pingpong(max(int(costs[0].state_bytes // 4), 1024)) if cp > 1 else None
    save_trace(model, args, cp)
    best = {f.name: min(getattr(c, f.name) for c in costs) for f in dataclasses.fields(Costs)
            if f.name not in ("meta", "heads", "summary")}
    return dict(steps=steps, costs=dataclasses.asdict(dataclasses.replace(costs[0], **best)), link=link)


def calibrate(args) -> dict:
    """CP=1 and CP=2 runs of bench.cp's model; each rank times one block in the same run; the
    simulator's predictions of both step times are compared with the measured ones."""
    from parallel.launch import run_distributed

    out = {}
    for cp in (1, 2):
        res = run_distributed(calibrate_worker, cp, args=(args, cp), timeout=3600, threads=1)
        steps = [max(ts) for ts in zip(*(r["steps"] for r in res))]
        fields = res[0]["costs"].keys()
        per_rank = [Costs(**r["costs"]) for r in res]
        costs = Costs(**{k: (sum(getattr(c, k) for c in per_rank) / cp if k not in ("meta", "heads") else
                             res[0]["costs"][k]) for k in fields})
        link = Link()
        if res[0]["link"]:
            lat, bw = res[0]["link"]
            link = Link(latency=lat, bandwidth=bw, inter_latency=lat, inter_bandwidth=bw, node_size=cp)
        pred = predict(costs, Setup(args.seq, args.layers, args.heads, 1, cp, 1, "pass", halo=True), link)
        measured = min(steps)
        out[f"cp{cp}"] = dict(measured=measured, steps=steps, predicted=pred.step,
                              error=pred.step / measured - 1, costs=dataclasses.asdict(costs),
                              link=dataclasses.asdict(link))
    return out


# ---------------------------------------------------------------------------------- tables
def table(c: Costs, link: Link, L: int, heads: int, seqs, Ps, M: int) -> list[dict]:
    rows = []
    for T in seqs:
        for P in Ps:
            row = dict(T=T, P=P)
            row["pass"] = predict(c, Setup(T, L, heads, 1, P, 1, "pass"), link).efficiency
            row["ulysses"] = (predict(c, Setup(T, L, heads, P, 1, 1, "ulysses"), link).efficiency
                              if heads % P == 0 else None)
            b = best_2d(c, T, L, heads, P, link)
            row["2d"], row["2d_layout"] = b.efficiency, f"{b.P_h}x{b.P_s}"
            row["interleaved"] = predict(c, Setup(T, L, heads, 1, P, M, "interleaved"), link).efficiency
            b = best_2d(c, T, L, heads, P, link, M)
            row["2d_interleaved"], row["2d_interleaved_layout"] = b.efficiency, f"{b.P_h}x{b.P_s}"
            rows.append(row)
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 3.6), sharey=True)
    axes = [axes] if len(seqs) == 1 else axes
    keys = [("pass", "pass (wavefront)"), ("ulysses", "Ulysses"), ("2d", "2-D (best P_h×P_s)"),
            ("interleaved", "interleaved pass"), ("2d_interleaved", "2-D interleaved")]
    for ax, T in zip(axes, seqs):
        rs = [r for r in rows if r["T"] == T]
        for k, lab in keys:
            pts = [(r["P"], r[k]) for r in rs if r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lab)
        ax.axhline(0.8, color="grey", lw=0.6, ls="--")
        ax.axhline(0.6, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{T // 1024}K tokens")
        ax.set_xlabel("P (ranks)")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("predicted step efficiency")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibrate", action="store_true", help="measure CP=1/CP=2 runs and one block, compare")
    p.add_argument("--calibrate-block", action="store_true", help="only time one block (this process) → --out")
    p.add_argument("--costs", help="a Costs JSON (from --calibrate-block or --calibrate)")
    p.add_argument("--out", help="where --calibrate-block writes its Costs JSON")
    p.add_argument("--preset", default="test", help="model preset for --calibrate-block (models/presets.py)")
    p.add_argument("--layer", default="ttt_linear")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", default="pass")
    p.add_argument("--docs", default="")
    p.add_argument("--trace", default=None, metavar="DIR", help="--calibrate: also write the runs' Chrome traces")
    p.add_argument("--schedule", default="pass", choices=SCHEDULES)
    p.add_argument("--P", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--P-h", type=int, default=None, help="2d: heads-group size (default: the best)")
    p.add_argument("--M", type=int, default=None,
                   help="micro-batches per step, run interleaved (default: 8 for interleaved and --table, 1 for 2d)")
    p.add_argument("--latency", type=float, default=Link.latency)
    p.add_argument("--bandwidth", type=float, default=Link.bandwidth)
    p.add_argument("--inter-latency", type=float, default=Link.inter_latency)
    p.add_argument("--inter-bandwidth", type=float, default=Link.inter_bandwidth)
    p.add_argument("--node-size", type=int, default=Link.node_size)
    p.add_argument("--compute-scale", type=float, default=1.0,
                   help="divide every compute cost by this (e.g. a GPU's speed-up over the calibrating CPU)")
    p.add_argument("--scan-scale", type=float, default=1.0,
                   help="multiply the scan costs by this (a device whose scan is relatively slower: higher f)")
    p.add_argument("--op-overhead", type=float, default=0.0, help="fixed seconds added to every compute op")
    p.add_argument("--table", action="store_true", help="efficiency of every schedule at --seqs × --P")
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--plot", default=None, help="--table: a PNG of it")
    p.add_argument("--chrome", default=None, help="write the simulated timelines of the first P as a Chrome trace")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    if args.calibrate:
        res = calibrate(args)
        for cp in (1, 2):
            r = res[f"cp{cp}"]
            print(f"CP={cp}: measured {r['measured']:.3f} s/step (best of {len(r['steps'])}), "
                  f"predicted {r['predicted']:.3f} s/step ({r['error']:+.1%})")
        print(f"speed-up measured {res['cp1']['measured'] / res['cp2']['measured']:.2f}x, "
              f"predicted {res['cp1']['predicted'] / res['cp2']['predicted']:.2f}x")
        if args.json:
            _write_json(dict(args=vars(args), **res), args.json)
        return res
    if args.calibrate_block:
        if not args.out:
            raise SystemExit("cp_sim: --calibrate-block needs --out FILE")
        import torch

        from models import preset_config

        torch.set_num_threads(1)
        cfg = preset_config(args.preset)
        for k, a in (("hidden_size", "hidden"), ("num_attention_heads", "heads"), ("num_hidden_layers", "layers")):
            setattr(args, a, getattr(cfg, k))
        c = measure_block(args, args.seq, repeats=args.steps)
        c.meta.update(preset=args.preset, threads=1, loadavg=open("/proc/loadavg").read().split()[:3])
        _write_json(dict(costs=dataclasses.asdict(c)), args.out)
        print(json.dumps(dataclasses.asdict(c), indent=1))
        return c
    if not args.costs:
        raise SystemExit("cp_sim: give --costs FILE (from --calibrate-block) or --calibrate")
    c = Costs.load(args.costs)
    if args.compute_scale != 1.0:
        s = args.compute_scale
        c = dataclasses.replace(c, **{k: getattr(c, k) / s for k in
                                      ("pre_f", "pre_b", "scan_f", "scan_b", "post_f", "post_b", "head_f", "head_b")})
    if args.scan_scale != 1.0:
        c = dataclasses.replace(c, scan_f=c.scan_f * args.scan_scale, scan_b=c.scan_b * args.scan_scale)
    link = Link(args.latency, args.bandwidth, args.inter_latency, args.inter_bandwidth, args.node_size)
    if args.M is not None and args.M < 1:
        raise ValueError(f"--M must be at least 1, got {args.M}")
    if args.table:
        args.M = args.M or 8
        rows = table(c, link, args.layers, args.heads, args.seqs, args.P, args.M)
        hdr = (f"{'tokens':>8} {'P':>4} {'pass':>6} {'ulysses':>8} {'2d':>6} {'layout':>7} {'interl.':>8} "
               f"{'2d+int.':>8} {'layout':>7}")
        print(f"predicted step efficiency; L={args.layers}, heads={args.heads}, M={args.M} (interleaved); "
              f"scan share f={c.scan_share():.2f}")
        print(hdr)
        for r in rows:
            u = "—" if r["ulysses"] is None else f"{r['ulysses']:.0%}"
            print(f"{r['T']:>8} {r['P']:>4} {r['pass']:>6.0%} {u:>8} {r['2d']:>6.0%} {r['2d_layout']:>7} "
                  f"{r['interleaved']:>8.0%} {r['2d_interleaved']:>8.0%} {r['2d_interleaved_layout']:>7}")
        if args.plot:
            plot(rows, args.plot, f"predicted (bench.cp_sim): {args.layers} layers, {args.heads} heads, "
                                  f"{c.meta.get('layer', '')}, M={args.M}")
        if args.json:
            _write_json(dict(args=vars(args), rows=rows), args.json)
        return rows
    preds = []
    for P in args.P:
        P_h, P_s, M = layout(args.schedule, P, args.heads, args.P_h,
                             args.M or (8 if args.schedule == "interleaved" else 1))
        s = Setup(args.seq, args.layers, args.heads, P_h, P_s, M, args.schedule, args.op_overhead)
        pr, ev = predict(c, s, link, events=True)
        preds.append(pr)
        print(f"{args.schedule:>11} P={P:4d} ({P_h}x{P_s}, M={M}): step {pr.step:.4g} s, serial {pr.serial:.4g} s, "
              f"efficiency {pr.efficiency:6.1%}, idle {pr.bubble:6.1%}, activations x{pr.extra_activation:g}")
        if args.chrome and P == args.P[0]:
            _write_json(to_chrome(ev), args.chrome)
    if args.json:
        _write_json(dict(args=vars(args), predictions=[dataclasses.asdict(x) for x in preds]), args.json)
    return preds


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"cp_sim: {e}", file=sys.stderr)
        sys.exit(2)
