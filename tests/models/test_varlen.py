"""Packed documents (models/common/varlen.py): a row of documents gives exactly the outputs, gradients and
final states of running each document alone — for every registered mixer (pre-conv, q/k convs,
momentum, attention windows, RoPE and chunk grids restart at the document start), with an incoming
state, while decoding, and for the training reset policies."""
import pytest
import torch

from models import MemoryLMForCausalLM, preset_config
from models.hf.configuration_memory import ATTENTION_LAYERS, MEMORY_LAYERS
from models.hf.modeling_memory import MemoryState
from models.common.varlen import (RowStates, _length_groups, doc_starts_from_cu_seqlens, doc_starts_from_ids,
                                  run_segments)
from tests.models.helpers import max_state_diff, perturb

KINDS = sorted(MEMORY_LAYERS) + sorted(ATTENTION_LAYERS)
# float64 models, but RMSNorm computes in float32 and logits are float32: the packed and the alone
# runs differ by float32 rounding of differently ordered sums. Measured over every mixer: outputs and
# states mostly bit-equal (≤ 1.2e-7), gradients ≤ 1.4e-7 relative to the parameter's gradient scale.
TOL = 1e-6
GRAD_TOL = 1e-6  # relative: |Δg| ≤ GRAD_TOL · max(1, max |g|), per parameter


def grad_err(g, ref):
    return ((g - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
SMALL = dict(mini_batch_size=4, deltanet_chunk_size=4, titans_chunk_size=4, titans_segment_size=8, lact_chunk_size=6,
             lact_num_heads=2, attention_window=5, num_persistent_tokens=2, pre_conv=True, conv_kernel=3)
# document starts of the two rows: inside chunks, a 1-token document, a start at the last column
STARTS = [[0, 5, 14], [0, 9, 10, 22]]
T = 23


def tiny(kinds, **kw):
    torch.manual_seed(0)
    kinds = [kinds] if isinstance(kinds, str) else kinds
    extra = dict(share_qk=True, use_gate=True) if any(k.startswith("ttt") for k in kinds) else {}
    cfg = preset_config("test", num_hidden_layers=len(kinds), layer_pattern=kinds, **{**SMALL, **extra, **kw})
    return perturb(MemoryLMForCausalLM(cfg), 0.05).double().eval()


def doc_ids_of(starts=STARTS, T=T):
    ids = torch.zeros(len(starts), T, dtype=torch.long)
    for b, row in enumerate(starts):
        for s in row[1:]:
            ids[b, s:] += 1
    return ids


def segments(starts=STARTS, T=T):
    return [[(a, e) for a, e in zip(row, [*row[1:], T])] for row in starts]


def state_row(state, b):
    """Row b of a model state (batched or RowStates blocks) as batch-1 blocks."""
    from models.common.varlen import split_rows

    return [split_rows(blk, len(blk.rows) if isinstance(blk, RowStates) else _batch(blk))[b] for blk in state.layers]


def _batch(blk):
    from models.common.varlen import _leaves

    return _leaves(blk)[0].shape[0]


def block_diff(a, b):
    from models.common.varlen import named_tensors, position_of

    ta, tb = named_tensors(a), named_tensors(b)
    assert ta.keys() == tb.keys() and position_of(a) == position_of(b)
    return max([0.0] + [(ta[k] - tb[k]).abs().max().item() for k in ta])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_row_equals_documents_alone(kind):
    """Logits, all parameter gradients and the final state of each row."""
    model = tiny(kind)
    ids = torch.randint(0, 128, (2, T))
    w = torch.randn(2, T, 128, dtype=torch.float64)
    out = model(ids, doc_ids=doc_ids_of())
    g_packed = torch.autograd.grad((out.logits * w).sum(), list(model.parameters()), allow_unused=True)
    total, finals = 0.0, []
    for b, segs in enumerate(segments()):
        for a, e in segs:
            alone = model(ids[b:b + 1, a:e])
            assert (out.logits[b:b + 1, a:e] - alone.logits).abs().max() <= TOL, (kind, b, a, e)
            total = total + (alone.logits * w[b:b + 1, a:e]).sum()
        finals.append(alone.memory_state)
    g_alone = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    for (name, _), g1, g2 in zip(model.named_parameters(), g_packed, g_alone):
        assert (g1 is None) == (g2 is None), name
        if g1 is not None:
            assert grad_err(g1, g2) <= GRAD_TOL, name
    # rows end at positions 9 and 1: a per-row state, each row equal to its last document's
    assert all(isinstance(blk, RowStates) for blk in out.memory_state.layers)
    for b in range(2):
        for blk, ref in zip(state_row(out.memory_state, b), finals[b].layers):
            assert block_diff(blk, ref) <= TOL


@pytest.mark.parametrize("kind", ["ttt_linear", "gated_deltanet", "titans", "lact", "attention"])
def test_gpu_grouping_is_exact(kind, monkeypatch):
    """The CUDA plan (coarse groups, padded lengths rounded up to 16) on CPU: still exact."""
    from models.common import varlen

    monkeypatch.setitem(varlen.CALL_COST_TOKENS, "cpu", varlen.CALL_COST_TOKENS["cuda"])
    monkeypatch.setitem(varlen.PAD_MULTIPLE, "cpu", varlen.PAD_MULTIPLE["cuda"])
    test_packed_row_equals_documents_alone(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_incoming_state_continues_only_the_first_document(kind):
    """With a memory state in: the first segment of each row continues it, a start at column 0
    (doc_starts) drops it, and the next call accepts the per-row state."""
    model = tiny(kind)
    ids = torch.randint(0, 128, (2, 30))
    prefix = model(ids[:, :7])
    starts = torch.zeros(2, 16, dtype=torch.bool)
    starts[0, 6] = True
    starts[1, 0] = True  # row 1 drops its incoming state
    out = model(ids[:, 7:23], memory_state=prefix.memory_state, doc_starts=starts)
    nxt = model(ids[:, 23:], memory_state=out.memory_state)  # continues from the per-row state
    # references: row 0 = ids[0, :13] then a new document ids[0, 13:]; row 1 = ids[1, 7:] alone
    r0a, r0b, r1 = model(ids[:1, :13]), model(ids[:1, 13:]), model(ids[1:, 7:])
    assert (out.logits[0, :6] - r0a.logits[0, 7:]).abs().max() <= TOL
    assert (torch.cat([out.logits[0, 6:], nxt.logits[0]]) - r0b.logits[0]).abs().max() <= TOL
    assert (torch.cat([out.logits[1], nxt.logits[1]]) - r1.logits[0]).abs().max() <= TOL
    for b, ref in ((0, r0b), (1, r1)):
        for blk, rblk in zip(state_row(nxt.memory_state, b), ref.memory_state.layers):
            assert block_diff(blk, rblk) <= TOL


def test_decoding_with_a_new_document_per_row():
    """Token-by-token decoding of a model with every mixer: a reset flag starts that row afresh
    (equal to decoding the new document alone); the other row continues; beam reordering works."""
    model = tiny(KINDS)
    ids = torch.randint(0, 128, (2, 14))
    state = model(ids[:, :5]).memory_state
    logits = []
    for t in range(5, 14):
        flag = torch.tensor([[t == 8], [False]])
        out = model(ids[:, t:t + 1], memory_state=state, doc_starts=flag)
        state = out.memory_state
        logits.append(out.logits)
    logits = torch.cat(logits, 1)
    assert (logits[0, 3:] - model(ids[:1, 8:]).logits[0]).abs().max() <= TOL
    assert (logits[1] - model(ids[1:]).logits[0, 5:]).abs().max() <= TOL
    assert (logits[0, :3] - model(ids[:1, :8]).logits[0, 5:]).abs().max() <= TOL
    swapped = model._reorder_cache(state, torch.tensor([1, 0]))
    out = model(ids[[1, 0], 13:14], memory_state=swapped)
    ref = model(ids[:, 13:14], memory_state=state)
    assert (out.logits - ref.logits.flip(0)).abs().max() <= TOL


def test_generate_continues_the_last_document_of_a_packed_prompt():
    model = tiny(["ttt_linear", "swa"]).float()
    ids = torch.randint(0, 128, (1, 12))
    doc_ids = doc_ids_of([[0, 7]], 12)
    gen = model.generate(ids, doc_ids=doc_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:, 7:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[:, 12:], alone[:, 5:])


def test_cu_seqlens_and_doc_ids_agree_and_plain_path_is_untouched():
    model = tiny(["gated_deltanet", "titans_mac"])
    ids = torch.randint(0, 128, (1, T))
    cu = torch.tensor([0, 5, 14, T])
    a = model(ids, cu_seqlens=cu).logits
    b = model(ids, doc_ids=doc_ids_of([[0, 5, 14]])).logits
    assert torch.equal(a, b)
    assert torch.equal(doc_starts_from_cu_seqlens(cu, T), doc_starts_from_ids(doc_ids_of([[0, 5, 14]])))
    one_doc = model(ids, doc_ids=torch.zeros(1, T, dtype=torch.long))
    plain = model(ids)
    assert torch.equal(one_doc.logits, plain.logits)  # no start inside: exactly the plain call
    assert not any(isinstance(blk, RowStates) for blk in one_doc.memory_state.layers)


def test_bad_packing_inputs():
    model = tiny("deltanet")
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="at most one of doc_ids, doc_starts"):
        model(ids, doc_ids=torch.zeros(2, 8, dtype=torch.long), doc_starts=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_ids must have the inputs' shape"):
        model(ids, doc_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens describes one flattened row"):
        model(ids, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="must rise from 0 to the sequence length 8"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match="doc_starts must be a bool tensor"):
        model(ids, doc_starts=torch.zeros(2, 8, dtype=torch.long))


def test_segment_batching_plan():
    """Padding vs calls: long and short segments go to separate calls; equal ones share one."""
    groups = _length_groups([900, 30, 880, 25, 31])
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3, 4]]
    assert _length_groups([10, 10, 10]) == [[0, 1, 2]]
    assert sorted(map(sorted, _length_groups([900, 30, 880, 25, 31], call_cost=4096))) == [[0, 1, 2, 3, 4]]  # CUDA
    # the runner on a toy causal map (cumulative sum with a carried total): exact per document
    x = torch.randn(3, 11, 2, dtype=torch.float64)
    starts = torch.zeros(3, 11, dtype=torch.bool)
    starts[0, [3, 4]] = True
    starts[2, 10] = True

    def cumsum(xs, st):
        y = xs.cumsum(1) + (0 if st is None else st)
        return y, y[:, -1:]

    y, st = run_segments(cumsum, x, starts)
    ref = torch.cat([x[0, :3].cumsum(0), x[0, 3:4], x[0, 4:].cumsum(0)])
    assert torch.allclose(y[0], ref) and torch.allclose(y[1], x[1].cumsum(0))
    assert torch.allclose(st[:, 0], torch.stack([ref[-1], x[1].sum(0), x[2, 10]]))


def test_gradient_checkpointing_with_documents():
    model = tiny(["ttt_mlp", "titans_mag"]).train()
    ids = torch.randint(0, 128, (2, T))

    def grads():
        model.zero_grad()
        model(ids, doc_ids=doc_ids_of(), use_cache=False).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.model.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        assert torch.equal(a, b)


def test_lazy_incoming_state_is_fetched_once_after_the_fresh_segments():
    """CP's receive: a callable state is called once, after the segments that start fresh ran,
    and also when no row continues it (the sender has sent it anyway)."""
    x = torch.randn(2, 6, 1, dtype=torch.float64)
    calls = []

    def cumsum(xs, st):
        calls.append("run" if st is None else "run with state")
        y = xs.cumsum(1) + (0 if st is None else st)
        return y, y[:, -1:]

    def incoming():
        calls.append("fetch")
        return torch.ones(2, 1, 1, dtype=torch.float64)

    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 2] = True
    y, _ = run_segments(cumsum, x, starts, incoming, need_state=False)
    assert calls == ["run", "fetch", "run with state"]
    assert torch.allclose(y[0, :2], 1 + x[0, :2].cumsum(0)) and torch.allclose(y[0, 2:], x[0, 2:].cumsum(0))
    calls.clear()
    starts[:, 0] = True
    run_segments(cumsum, x, starts, incoming, need_state=False)
    assert calls == ["run", "fetch"]
