"""TP (by heads) and CP (state passing, Ulysses) equal the single-process model: logits, loss and
the gradient of every parameter, float32, ≤ 1e-5. One 4-process gloo job runs all layouts
(tp, cp) ∈ {(1,1), (1,2), (1,4), (2,1), (2,2)} (dp = 4 / (tp·cp)); the tests read its results."""
import itertools

import pytest
import torch

from parallel import ParallelDims, cp_slice, parallelize
from tests.parallel import workers
from parallel.launch import run_distributed

TOL = 1e-5
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)]
SEQ = 40  # mini-batch 8: local lengths 20 (cp=2) and 10 (cp=4) cut mid-mini-batch
TTT = list(workers.TTT_VARIANTS)
CASES = [(v, m, SEQ) for v, m in itertools.product(TTT, ["pass", "ulysses"])]
CASES += [(v, "pass", SEQ) for v in workers.GENERIC_VARIANTS]
CASES += [(v, "prefix", SEQ) for v in workers.PREFIX_VARIANTS]
CASES += [("mlp+conv+shareqk+gate", "pass", 32)]  # local lengths 16 and 8: cuts on mini-batch boundaries
EXPECTED = [(tp, cp, v, m, s) for tp, cp in LAYOUTS for v, m, s in CASES if workers.supported(tp, cp, v, m)]


@pytest.fixture(scope="module")
def suite():
    results = run_distributed(workers.suite_worker, 4, args=(LAYOUTS, CASES), timeout=300)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("key", EXPECTED, ids=lambda k: "tp{}-cp{}-{}-{}-T{}".format(*k))
def test_equals_single_process(suite, key):
    for rank, res in enumerate(suite):
        r = res["equivalence"][key]
        tol = TOL if r["dtype"] == "torch.float32" else 1e-10
        assert not r["zero_grads"], f"reference grads are zero for {r['zero_grads']}: the test would be blind there"
        assert r["logits"] <= tol, (rank, r)
        assert r["loss"] <= tol, (rank, r)
        assert r["grad"] <= tol, (rank, r)


@pytest.mark.slow
@pytest.mark.parametrize("variant", workers.STATE_DICT_VARIANTS)
def test_state_dict_gather_and_load(suite, variant):
    for res in suite:
        sd = res["state_dict"][variant]
        assert sd["shapes_ok"]
        assert sd["max_diff"] == 0.0
        assert sd["round_trip"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_prefix_combine_delta_rule(suite, cp):
    """The affine-state scheme (all-gather + prefix combine) on a reference DeltaNet recurrence."""
    for res in suite:
        diffs = res["prefix"][cp]
        assert max(diffs.values()) <= 1e-10, diffs  # float64


@pytest.mark.slow
def test_wavefront_overlaps_ranks(suite):
    """CP=2, 4 layers: rank 1 receives layer 0's state while rank 0 is still computing later
    layers, and in backward rank 0 gets layer 3's state gradient while rank 1 is still busy."""
    from parallel.context import KIND_STATE

    def times(rank, event):
        return {layer: t for e, layer, kind, t in suite[rank]["wavefront"]["trace"] if e == event and kind == KIND_STATE}

    sent, got = times(0, "send"), times(1, "recv")
    assert sorted(sent) == sorted(got) == [0, 1, 2, 3]
    assert got[0] < sent[3], "rank 1 only started after rank 0 had finished its forward: no wavefront"
    assert all(sent[i] < sent[i + 1] for i in range(3))
    got_grad, sent_grad = times(0, "recv_grad"), times(1, "send_grad")
    assert sorted(got_grad) == sorted(sent_grad) == [0, 1, 2, 3]
    assert got_grad[3] < sent_grad[0], "rank 0's backward waited for rank 1's whole backward: no wavefront"


@pytest.mark.slow
def test_prefix_and_attention_pass_no_state(suite):
    """cp_mode='prefix' on DeltaNet + full attention: the only point-to-point traffic is the short
    convs' K−1-token halo of the DeltaNet layer (the state comes from the all-gathered summaries,
    the attention's keys/values from an all-gather): no serial chain."""
    from parallel.context import KIND_HALO

    assert suite[0]["wavefront"]["prefix_p2p"] == [("recv_grad", 0, KIND_HALO), ("send", 0, KIND_HALO)]
    assert suite[1]["wavefront"]["prefix_p2p"] == [("recv", 0, KIND_HALO), ("send_grad", 0, KIND_HALO)]


@pytest.mark.slow
def test_eval_frozen_embedding_and_bf16(suite):
    for res in suite:
        x = res["extras"]
        assert x["eval"] <= TOL  # no_grad forward, twice
        assert x["frozen_embedding"] <= TOL
        assert x["frozen_stays_frozen"]
        assert x["reduce_gradients"] == 0.0
        assert x["bf16_grads_finite"]
        assert x["bf16_logits"] <= 0.02 * x["bf16_logits_scale"]  # a few bf16 ulps


@pytest.mark.slow
def test_world_not_divisible(suite):
    for res in suite:
        assert "not divisible by tp × cp" in res["errors"]["world"]


# ------------------------------------------------------------------ errors (no process group)
def _model(**kw):
    return workers.build_reference("linear", **kw)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor parallel size tp=8"):
        parallelize(_model(), ParallelDims(tp=8))


def test_ulysses_refused_for_other_mixers():
    hybrid = workers.build_reference("gated_deltanet+swa")
    with pytest.raises(ValueError, match="ulysses"):
        parallelize(hybrid, ParallelDims(cp=2), cp_mode="ulysses")


@pytest.mark.parametrize("variant", ["gated_deltanet+swa", "titans_mac", "titans_mag", "titans_mal", "lact"])
def test_heads_not_divisible_by_tp_every_mixer(variant):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor parallel size tp=8"):
        parallelize(workers.build_reference(variant), ParallelDims(tp=8))


def test_lact_heads_not_divisible_by_tp():
    with pytest.raises(ValueError, match="lact_num_heads=1 is not divisible by tensor parallel size tp=2"):
        parallelize(workers.build_reference("lact", lact_num_heads=1), ParallelDims(tp=2))


def test_strided_shard_round_trip():
    from parallel.tensor import shard_of, unshard

    t = torch.arange(24.0).view(12, 2)
    for stride in (1, 3):
        parts = [shard_of(t, 2, r, 0, stride) for r in range(2)]
        assert torch.equal(unshard(parts, 0, stride), t)
    assert shard_of(t, 2, 1, 0, 3)[:, 0].tolist() == [4, 6, 12, 14, 20, 22]  # rank 1's half of each block


def test_seq_not_divisible_by_cp():
    with pytest.raises(ValueError, match="sequence length 42 is not divisible by context parallel size cp=4"):
        cp_slice(torch.zeros(2, 42), ParallelDims(cp=4, cp_rank=1))
    assert cp_slice(torch.arange(8)[None], ParallelDims(cp=4, cp_rank=1)).tolist() == [[2, 3]]


def test_ulysses_needs_cp_dividing_heads():
    with pytest.raises(ValueError, match="ulysses"):
        parallelize(_model(), ParallelDims(tp=2, cp=4), cp_mode="ulysses")


def test_prefix_refused_for_nonaffine_layers():
    with pytest.raises(ValueError, match="affine"):
        parallelize(_model(), ParallelDims(cp=2), cp_mode="prefix")
    for variant in ("titans_mag", "lact"):
        with pytest.raises(ValueError, match="affine"):
            parallelize(workers.build_reference(variant), ParallelDims(cp=2), cp_mode="prefix")
    with pytest.raises(ValueError, match="unknown cp_mode"):
        parallelize(_model(), ParallelDims(cp=2), cp_mode="ring")


def test_single_process_parallelize_is_identity():
    ref = _model()
    ids = torch.randint(0, 128, (2, 24))
    want = ref(ids).logits
    model = parallelize(workers.build_reference("linear"), ParallelDims())
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="parallel_cross_entropy"):
        model(ids, labels=ids)


def test_cp_plan_per_mixer():
    """Which CP scheme each mixer gets (no process group needed to build the plan)."""
    def kinds(variant, mode):
        m = parallelize(workers.build_reference(variant), ParallelDims(cp=2, cp_rank=1), cp_mode=mode)
        return [type(b.mixer).__mro__[1].__name__ for b in m.model.layers]

    assert kinds("deltanet+attention", "pass") == ["CPPassMixer", "CPAttention"]
    assert kinds("deltanet+attention", "prefix") == ["CPPrefixDeltaNet", "CPAttention"]
    assert kinds("gated_deltanet+swa", "prefix") == ["CPPrefixDeltaNet", "CPAttention"]
    assert kinds("linear", "pass") == ["CPPassMixer", "CPPassMixer"]
    assert kinds("titans_mag", "pass") == ["CPPassMixer", "CPPassMixer"]


def test_ttt_hooks_keep_float64_and_equal_forward():
    """The models/ hooks parallel/ relies on: TTTLayer.forward = prepare → scan → output, and
    init_state keeps float64 in a float64 model."""
    model = workers.build_reference("mlp+conv+shareqk+gate", dtype=torch.float64)
    layer = model.model.layers[0].mixer
    assert layer.init_state(2).weights["W1"].dtype == torch.float64
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    y, _ = layer(x)
    st = layer.init_state(2)
    q, k, v, lr, _ = layer.prepare(x, st)
    out, _, _ = layer.scan_from(st.weights, None, q, k, v, lr, 0)
    torch.testing.assert_close(layer.output(x, out), y, rtol=0, atol=0)
