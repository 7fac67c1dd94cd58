"""Hope (models/layers/hope.py): the self-modifying memory and the continuum memory system — chunked =
token-by-token reference, one call = pieces, gradcheck, CMS update timing."""
import pytest
import torch

from models import MemoryLMConfig
from models.layers.hope import HopeLayer
from models.ops.hope.chunk import cms_level_chunked, self_modifying_chunked
from models.ops.hope.naive import cms_level_reference, self_modifying_reference
from models.hf.modeling_memory import build_mixer
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, random_cuts, run_pieces)

F64 = torch.float64


def mixer(**kw):
    cfg = dict(hidden_size=32, num_attention_heads=4, memory_layer="hope", num_hidden_layers=1, conv_kernel=3,
               hope_chunk_size=4, hope_cms_chunk_sizes=[3, 8])
    cfg.update(kw)
    return perturb(build_mixer(MemoryLMConfig(**cfg), 0).to(F64))


@pytest.mark.parametrize("kw", [dict(), dict(hope_chunk_size=1), dict(hope_chunk_size=5, hope_cms_chunk_sizes=[2, 7, 16],
                                                                       hope_memory_expansion=1)])
def test_chunked_equals_reference_in_pieces(kw):
    layer = mixer(**kw)
    x = torch.randn(2, 21, 32, dtype=F64)
    for cuts in ([], [3, 10, 17]):
        layer.scan_impl = "chunk"
        y, s = run_pieces(layer, x, cuts)
        layer.scan_impl = "reference"
        y_ref, s_ref = run_pieces(layer, x, cuts)
        assert (y - y_ref).abs().max() <= 1e-5
        assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_one_call_equals_k_pieces(seed):
    T = 23
    check_one_call_equals_pieces(mixer(), torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


def test_gradients_reach_every_parameter():
    check_gradients_reach_every_parameter(mixer(), torch.randn(2, 13, 32, dtype=F64))


def test_cms_level_changes_only_at_span_ends():
    layer = mixer(hope_cms_chunk_sizes=[8])
    init = layer.init_state(1).extra["cms0"].weights
    x = torch.randn(1, 12, 32, dtype=F64)
    _, s = layer(x[:, :7])
    level = s.extra["cms0"]
    assert all(torch.equal(level.weights[n], init[n]) for n in init)  # 7 < 8 tokens: not updated yet
    assert all(level.opt["pending"][n].abs().max() > 0 for n in init)
    _, s = layer(x[:, 7:12], s)  # crosses the span end at 8
    level = s.extra["cms0"]
    assert all((level.weights[n] - init[n]).abs().max() > 0 for n in init)
    # reading the first 8 tokens uses the initial weights: outputs do not depend on where the call is cut
    y_all = layer(x[:, :8])[0]
    y_cut = torch.cat([layer(x[:, :5])[0], layer(x[:, 5:8], layer(x[:, :5])[1])[0]], 1)
    assert (y_all - y_cut).abs().max() <= 1e-12


@pytest.mark.parametrize("position", [0, 2])
def test_gradcheck_self_modifying(position):
    g = torch.Generator().manual_seed(2)
    B, H, T, d, e, b = 1, 1, 5, 2, 2, 3

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    def memories():
        return {m: {"W1": rnd(B, H, d, e), "W2": rnd(B, H, e, 1 if m in ("lr", "decay") else d)}
                for m in ("key", "value", "lr", "decay", "memory")}

    weights, anchor = memories(), (memories() if position % b else None)
    leaves = [t for w in (weights, anchor or {}) for m in w.values() for t in m.values()]
    q, u, lr_b, dec_b = rnd(B, H, T, d), rnd(B, H, T, d), rnd(H), rnd(H)

    def rebuild(flat):
        it = iter(flat)
        w = {m: {n: next(it) for n in ws} for m, ws in weights.items()}
        a = {m: {n: next(it) for n in ws} for m, ws in anchor.items()} if anchor else None
        return w, a

    def fn(*flat):
        w, a = rebuild(flat[: len(leaves)])
        o, w, _ = self_modifying_chunked(w, a, *flat[len(leaves):], 0.5, position, b)
        return (o, *[t for m in w.values() for t in m.values()])

    inputs = [*leaves, q, u, lr_b, dec_b]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    w, a = rebuild(leaves)
    o_c = self_modifying_chunked(w, a, q, u, lr_b, dec_b, 0.5, position, b)[0]
    o_r = self_modifying_reference(w, a, q, u, lr_b, dec_b, 0.5, position, b)[0]
    assert (o_c - o_r).abs().max() <= 1e-10


def test_gradcheck_cms_level():
    g = torch.Generator().manual_seed(3)

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    B, H, T, d, e = 1, 2, 7, 2, 3
    w1, w2, p1, p2 = rnd(B, H, d, e), rnd(B, H, e, d), rnd(B, H, d, e, scale=0.1), rnd(B, H, e, d, scale=0.1)
    k, v, lr = rnd(B, H, T, d), rnd(B, H, T, d), torch.rand(B, H, T, generator=g, dtype=F64).requires_grad_()

    def fn(w1, w2, p1, p2, k, v, lr):
        o, w, p = cms_level_chunked({"W1": w1, "W2": w2}, {"W1": p1, "W2": p2}, k, v, lr, 1, 3)
        return o, *w.values(), *p.values()

    assert torch.autograd.gradcheck(fn, (w1, w2, p1, p2, k, v, lr), eps=1e-6, atol=1e-5, rtol=1e-4)
    ref = cms_level_reference({"W1": w1, "W2": w2}, {"W1": p1, "W2": p2}, k, v, lr, 1, 3)
    for a, b in zip(fn(w1, w2, p1, p2, k, v, lr), (ref[0], *ref[1].values(), *ref[2].values())):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("kwargs,match", [
    (dict(hope_cms_chunk_sizes=[]), "hope_cms_chunk_sizes"),
    (dict(hope_chunk_size=0), "hope_chunk_size"),
    (dict(hope_base_lr=0.0), "hope_base_lr"),
])
def test_bad_hope_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(memory_layer="hope", **kwargs)


def test_build():
    assert isinstance(build_mixer(MemoryLMConfig(memory_layer="hope", hidden_size=32, num_attention_heads=4,
                                                 num_hidden_layers=1), 0), HopeLayer)
