"""Two-dimensional CP (cp_mode="2d", P_h × P_s) and micro-batch interleaving of the wavefront equal
the single-process model: logits and the gradient of every parameter, float32, ≤ 1e-5, packed
documents included. One 4-process gloo job runs every layout:

    2 × 2 (tp 1, cp 4)      heads exchanged in pairs {0,1} {2,3}, the state passed 0→2 and 1→3
    1 × 4 (cp_heads 1)      cp_mode="2d" degenerates to the pass
    2 × 1 with TP 2         Ulysses inside the 2-D code path, TP by heads on top
    2 × 1, DP 2             the groups of two DP replicas

Sequence 40 (mini-batch 8): pieces of 10, chunks of 20 per head group, so the state crosses
mid-mini-batch (TTT's pending sum) and mid-chunk (DeltaNet). A second 4-process job runs every other
family whose scan runs on a head slice (models/layers/registry.py ``ScanHeads``) at 2 × 2, plain and with
packed documents, and one interleaved."""
from __future__ import annotations

import copy

import pytest
import torch

from parallel import ParallelDims, parallelize
from parallel.launch import run_distributed
from tests.parallel import workers

TOL = 1e-5
SEQ = 40
VARIANTS_2D = ("linear", "mlp+conv+shareqk+gate", "gated_deltanet+swa", "deltanet+attention")
PACKED = ("mlp+conv+shareqk+gate", "gated_deltanet+swa")
DOC_STARTS = [[0, 7, 20, 26], [0, 13]]  # inside pieces, exactly at the head groups' cut (20), one across
M = 3  # interleaved micro-batches
LAYOUTS = {"2x2": (1, 4, 2), "1x4": (1, 4, 1), "tp2-2x1": (2, 2, 2), "dp2-2x1": (1, 2, 2)}
# every other family with a ScanHeads entry (LaCT, Memora, ATLAS in float64 as in tests/parallel/workers.py:
# their Newton–Schulz / softmax memory amplify float32 rounding past 1e-5 under any CP)
FAMILIES = ("titans", "titans_mag", "lact", "moneta", "yaad", "memora", "atlas", "tnt", "kda")
FAMILY_CASES = [("2x2", v, "2d", "plain") for v in FAMILIES] + [("2x2", v, "2d", "packed") for v in
                                                                 ("titans_mag", "tnt", "kda")]
FAMILY_CASES += [("2x2", "kda", "2d", "interleaved"), ("2x2", "titans_mag", "2d", "interleaved-packed")]


CASES = [("2x2", v, "2d", "plain") for v in VARIANTS_2D] + [("2x2", v, "2d", "packed") for v in PACKED]
CASES += [("2x2", v, "2d", "interleaved") for v in PACKED]
CASES += [("2x2", "mlp+conv+shareqk+gate", "2d", "interleaved-packed"), ("1x4", "gated_deltanet+swa", "pass",
                                                                         "interleaved-packed")]
CASES += [("1x4", "linear", "2d", "plain"), ("1x4", "linear", "pass", "interleaved"),
          ("1x4", "gated_deltanet+swa", "pass", "interleaved")]
CASES += [("tp2-2x1", v, "2d", "plain") for v in PACKED] + [("dp2-2x1", "mlp+conv+shareqk+gate", "2d", "plain")]


# the state messages are traced on one channel (2-D with documents passes the block state over the
# whole CP group, not the sequence group: not in this list)
ORDER_CASES = [k for k in CASES if k[3] == "interleaved"] + [("1x4", "gated_deltanet+swa", "pass", "interleaved-packed")]


def _doc_ids(B: int, T: int) -> torch.Tensor:
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, starts in enumerate(DOC_STARTS[:B]):
        for s in starts[1:]:
            ids[b, s:] += 1
    return ids


def _full_logits(logits, dims):
    import torch.distributed as dist

    if dims.tp == 1:
        return logits.detach()
    parts = [torch.empty_like(logits) for _ in range(dims.tp)]
    dist.all_gather(parts, logits.detach().contiguous(), group=dims.tp_group)
    return torch.cat(parts, -1)


def _diffs(logits, ref_logits, grads, ref_grads, dims):
    from parallel.loss import cp_slice

    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    g = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in grads}
    worst = max(g, key=g.get)
    return dict(logits=max((a - cp_slice(b, dims)).abs().max().item() for a, b in zip(logits, ref_logits)),
                grad=g[worst], worst=worst, zero_grads=[k for k, v in ref_grads.items() if v.abs().max() == 0])


def _reference(model, batches):
    """Single process: Σ_m grad(loss_sum_m / N), N the tokens counted over all micro-batches."""
    import torch.nn.functional as F

    ref = copy.deepcopy(model)
    n = sum((tgt != -100).sum() for _, tgt, _ in batches)
    logits = []
    for ids, tgt, doc in batches:
        lg = ref(ids, **doc).logits
        F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum").div(n).backward()
        logits.append(lg.detach())
    return logits, {k: p.grad.detach().clone() for k, p in ref.named_parameters() if p.requires_grad}


def _parallel(model, dims, mode, batches, interleave: bool):
    from parallel import gather_full_grads, parallel_cross_entropy
    from parallel.interleave import global_counts, interleaved_step, resolve_documents
    from parallel.loss import cp_slice

    par = parallelize(copy.deepcopy(model), dims, cp_mode=mode)
    local = [(cp_slice(i, dims), cp_slice(t, dims), {k: cp_slice(v, dims) for k, v in d.items()}) for i, t, d in batches]
    n = global_counts([t for _, t, _ in local], dims).sum() / dims.dp  # every DP replica runs the same batch
    logits = []

    def forward(mb):
        ids, tgt, doc = mb
        lg = par(ids, **doc).logits
        logits.append(_full_logits(lg, dims))
        return parallel_cross_entropy(lg, tgt, dims)[0] / n

    if interleave:  # record the state messages: of the sequence group under 2d
        (par.model.layers[0].mixer._cp_seq_comm if mode == "2d" else par._cp_comm).trace = []
        docs = resolve_documents([d.get("doc_ids") for _, _, d in local], dims)  # before the forwards
        local = [(i, t, {} if r is None else {"cp_documents": r}) for (i, t, _), r in zip(local, docs)]
        interleaved_step(par, local, forward)
    else:
        for mb in local:
            forward(mb).backward()
    return par, logits, gather_full_grads(par, dims)


def suite_worker(variants=VARIANTS_2D, packed_variants=PACKED, cases=CASES, layouts=LAYOUTS, trace=True):
    from parallel import init_parallel
    from parallel.context import KIND_STATE
    from parallel.loss import causal_targets

    out = {}
    refs = {}
    for v in variants:
        model = workers.build_reference(v, dtype=workers.DTYPES.get(v, torch.float32))
        gen = torch.Generator().manual_seed(7)
        ids = [torch.randint(0, model.config.vocab_size, (2, SEQ), generator=gen) for _ in range(M)]
        batches = [(i, causal_targets(i), {}) for i in ids]
        refs[v, "plain"] = (model, batches[:1], *_reference(model, batches[:1]))
        refs[v, "interleaved"] = (model, batches, *_reference(model, batches))
        if v in packed_variants:
            packed = [(ids[0], causal_targets(ids[0]), {"doc_ids": _doc_ids(2, SEQ)})]
            refs[v, "packed"] = (model, packed, *_reference(model, packed))
            # micro-batches with documents (the first), without a start (the second: plain path), shifted
            docs = [_doc_ids(2, SEQ), torch.zeros(2, SEQ, dtype=torch.long), _doc_ids(2, SEQ).roll(5, 1)]
            packed = [(i, causal_targets(i), {"doc_ids": d}) for i, d in zip(ids, docs)]
            refs[v, "interleaved-packed"] = (model, packed, *_reference(model, packed))
    for name, (tp, cp, ph) in layouts.items():
        dims = init_parallel(tp=tp, cp=cp, cp_heads=ph)
        out[name, "groups"] = dict(cp_rank=dims.cp_rank, head=dims.cp_head_rank, seq=dims.cp_seq_rank,
                                   seq_prev=dims.cp_seq_prev, seq_next=dims.cp_seq_next, rank=dims.rank,
                                   cp_global=dims.cp_global_ranks)
        for layout, v, mode, kind in cases:
            if layout != name:
                continue
            model, batches, ref_logits, ref_grads = refs[v, kind]
            par, logits, grads = _parallel(model, dims, mode, batches, kind.startswith("interleaved"))
            r = _diffs(logits, ref_logits, grads, ref_grads, dims)
            if kind.startswith("interleaved"):
                comm = par.model.layers[0].mixer._cp_seq_comm if mode == "2d" else par._cp_comm
                ev = [(e, t) for e, _, k, t in comm.trace if k == KIND_STATE]
                r["sends"] = [t for e, t in ev if e == "send"]
                r["recv_grads"] = [t for e, t in ev if e == "recv_grad"]
                r["send_grads"] = [t for e, t in ev if e == "send_grad"]
            out[layout, v, mode, kind] = r
        if name == "2x2" and trace:
            out["trace"] = _traced_order(dims, refs["linear", "plain"])
    return out


def _traced_order(dims, ref):
    """Per-rank order of scans and state messages of a traced 2 × 2 run (parallel/trace.py)."""
    from bench.cp_sim import order_of_trace
    from parallel import parallel_cross_entropy
    from parallel.loss import cp_slice
    from parallel.trace import attach_tracer

    model, ((ids, tgt, _),), _, _ = ref
    par = parallelize(copy.deepcopy(model), dims, cp_mode="2d")
    tracer = attach_tracer(par)
    parallel_cross_entropy(par(cp_slice(ids, dims)).logits, cp_slice(tgt, dims), dims)[0].backward()
    return order_of_trace(tracer.trace()["traceEvents"])


@pytest.fixture(scope="module")
def suite():
    return run_distributed(suite_worker, 4, timeout=600)  # process start-up dominates on a loaded 2-core machine


@pytest.mark.slow
@pytest.mark.parametrize("key", CASES, ids="-".join)
def test_2d_and_interleaved_equal_single_process(suite, key):
    for rank, res in enumerate(suite):
        r = res[key]
        assert not r["zero_grads"], r["zero_grads"]
        assert r["logits"] <= TOL and r["grad"] <= TOL, (rank, r)


@pytest.fixture(scope="module")
def family_suite():
    packed = {v for _, v, _, k in FAMILY_CASES if k != "plain"}
    return run_distributed(suite_worker, 4, args=(FAMILIES, packed, FAMILY_CASES, {"2x2": LAYOUTS["2x2"]}, False),
                           timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("key", FAMILY_CASES, ids="-".join)
def test_2d_every_head_independent_family_equals_single_process(family_suite, key):
    for rank, res in enumerate(family_suite):
        r = res[key]
        assert not r["zero_grads"], r["zero_grads"]
        assert r["logits"] <= TOL and r["grad"] <= TOL, (rank, r)


@pytest.mark.slow
def test_2d_group_coordinates(suite):
    """CP rank c = s·P_h + h; the state goes to c + P_h (megatron's hierarchical CP groups)."""
    for rank, res in enumerate(suite):
        g = res["2x2", "groups"]
        assert (g["cp_rank"], g["head"], g["seq"]) == (rank, rank % 2, rank // 2)
        assert (g["seq_prev"], g["seq_next"]) == ((None, rank + 2) if rank < 2 else (rank - 2, None))
        g = res["dp2-2x1", "groups"]
        assert g["cp_global"] == ((0, 1) if rank < 2 else (2, 3)) and g["seq_prev"] is None is g["seq_next"]


@pytest.mark.slow
@pytest.mark.parametrize("key", ORDER_CASES, ids="-".join)
def test_interleaving_runs_every_forward_before_the_backwards(suite, key):
    """Rank 0 sends the states of all M micro-batches before any state gradient reaches it, and the
    last rank of its sequence group starts the backward wave only after that: one fill per step (the
    plain loop sends micro-batch m+1's states only after micro-batch m's gradients came back)."""
    last = 3 if key[0] == "1x4" else 2  # the last sequence rank of rank 0's sequence group
    first, final = suite[0][key], suite[last][key]
    assert len(first["sends"]) >= M and first["recv_grads"] and final["send_grads"]
    assert max(first["sends"]) < min(first["recv_grads"])
    assert max(first["sends"]) < min(final["send_grads"])


@pytest.mark.slow
def test_2d_schedule_matches_the_simulator(suite):
    """The event order of the traced 2 × 2 run (scan starts, state sends and receives over the
    sequence groups, forward and backward) is bench.cp_sim's "2d" schedule."""
    from bench.cp_sim import Costs, Link, Setup, order_of_sim, programs, simulate

    c = Costs(pre_f=1e-6, pre_b=2e-6, scan_f=1.5e-6, scan_b=3e-6, post_f=2e-6, post_b=4e-6, state_bytes=1e4)
    sim = simulate(programs(c, Setup(SEQ, 2, 4, 2, 2, 1, "2d"), Link()), Link())
    for rank, res in enumerate(suite):
        assert res["trace"] == order_of_sim(sim[rank]), rank


# ------------------------------------------------------------------ errors (no process group)
@pytest.mark.parametrize("variant,why", [("titans_mal", "memory's output projection"),
                                         ("titans_mac", "each segment's attention"), ("hope", "CMS levels")])
def test_2d_refuses_layers_whose_heads_interact(variant, why):
    with pytest.raises(ValueError, match=f"cp_mode='2d' runs each memory layer's scan on a slice of its heads; "
                                         f"{variant}'s heads interact .*{why}"):
        parallelize(workers.build_reference(variant), ParallelDims(cp=4, cp_heads=2), cp_mode="2d")


def test_2d_refuses_inner_loop_knobs():
    with pytest.raises(ValueError, match="cp_mode='2d' does not take the inner-loop knobs"):
        parallelize(workers.build_reference("gated_deltanet+swa", inner_init_pull=0.1), ParallelDims(cp=4, cp_heads=2),
                    cp_mode="2d")


def test_2d_needs_cp_heads_dividing_the_local_heads():
    with pytest.raises(ValueError, match=r"cp_heads \(4\) to divide the heads per TP rank \(2\) of ttt_linear"):
        parallelize(workers.build_reference("linear"), ParallelDims(tp=2, cp=4, cp_heads=4), cp_mode="2d")
    with pytest.raises(ValueError, match="cp_heads=3 does not divide the context parallel size cp=4"):
        ParallelDims(cp=4, cp_heads=3)
    with pytest.raises(ValueError, match="cp_heads=2 splits the CP group for cp_mode='2d', not 'pass'"):
        parallelize(workers.build_reference("linear"), ParallelDims(cp=4, cp_heads=2), cp_mode="pass")


def test_2d_plan():
    m = parallelize(workers.build_reference("gated_deltanet+swa"), ParallelDims(cp=4, cp_heads=2, cp_rank=3),
                    cp_mode="2d")
    assert [type(b.mixer).__mro__[1].__name__ for b in m.model.layers] == ["CP2DMixer", "CPAttention"]
    seq = m.model.layers[0].mixer._cp_seq_comm
    assert (seq.prev, seq.next) == (1, None)
