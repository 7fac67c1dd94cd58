"""LaCT: large-chunk apply-then-update (chunked = token-by-token reference), splits, gradients."""
import pytest
import torch

from models import MemoryLMConfig
from models.layers.lact import LaCTLayer
from models.ops.lact.chunk import lact_scan_chunked
from models.ops.lact.naive import lact_scan_reference
from models.common.parts import newton_schulz
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, random_cuts)

F64 = torch.float64
OPTIONS = [dict(optimizer="muon", momentum=True), dict(optimizer="sgd", momentum=False),
           dict(optimizer="muon", momentum=False), dict(optimizer="sgd", momentum=True)]


def lact(**kw):
    cfg = dict(num_lact_heads=2, chunk_size=6, window=4, base_lr=0.1)
    cfg.update(kw)
    return perturb(LaCTLayer(32, 4, **cfg).to(F64))


@pytest.mark.parametrize("opts", OPTIONS)
def test_chunked_equals_reference(opts):
    layer = lact(**opts)
    x = torch.randn(2, 23, 32, dtype=F64)  # 3 chunks + a partial one
    y, s = layer(x)
    layer.scan_impl = "reference"
    y_ref, s_ref = layer(x)
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("opts", OPTIONS[:2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_call_equals_k_pieces(opts, seed):
    T = 29
    check_one_call_equals_pieces(lact(**opts), torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


@pytest.mark.parametrize("opts", OPTIONS[:2])
def test_gradients_reach_every_parameter(opts):
    check_gradients_reach_every_parameter(lact(**opts), torch.randn(2, 14, 32, dtype=F64))


def test_apply_then_update_order():
    """Outputs of the first chunk do not depend on its own keys/values (they read the initial W)."""
    layer = lact(window=1)  # attention sees only the token itself
    x = torch.randn(1, 12, 32, dtype=F64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 4] += 1.0  # change a token inside chunk 0
    y2, _ = layer(x2)
    unchanged = [t for t in range(6) if t != 4]
    assert (y[:, unchanged] - y2[:, unchanged]).abs().max() <= 1e-12
    assert (y[:, 6:] - y2[:, 6:]).abs().max() > 1e-6  # chunk 1 reads the weights updated by chunk 0


def test_newton_schulz_orthogonalises():
    g = torch.randn(3, 8, 5, dtype=F64)
    x = newton_schulz(g)
    sv = torch.linalg.svdvals(x)
    assert sv.min() > 0.6 and sv.max() < 1.3  # the quintic schedule lands near 1, not exactly


@pytest.mark.parametrize("muon,position", [(True, 0), (False, 2)])
def test_gradcheck_lact_scan(muon, position):
    g = torch.Generator().manual_seed(2)
    B, H, T, d, dh, C = 1, 1, 5, 3, 4, 3

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    shapes = {"W0": (d, dh), "W1": (dh, d), "W2": (d, dh)}
    weights = {n: rnd(B, H, *s) for n, s in shapes.items()}
    mom = {n: rnd(B, H, *s, scale=0.1) for n, s in shapes.items()}
    pending = {n: rnd(B, H, *s, scale=0.1) for n, s in shapes.items()} if position else None
    m_sum = torch.rand(B, H, generator=g, dtype=F64).requires_grad_() if position else None
    q, k, v = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    lrs = [torch.rand(B, H, T, generator=g, dtype=F64).requires_grad_() for _ in range(4)]
    norms = {n: (1 + torch.rand(1, 1, 1, s[1], generator=g, dtype=F64)) for n, s in shapes.items()}
    names = list(shapes)
    n_p = 3 if position else 0

    def unpack(flat):
        w = dict(zip(names, flat[:3]))
        p = dict(zip(names, flat[3 : 3 + n_p])) if position else None
        ms = flat[3 + n_p] if position else None
        rest = flat[3 + n_p + (1 if position else 0):]
        mm = dict(zip(names, rest[:3]))
        return w, p, ms, mm, *rest[3:]

    def fn(*flat):
        o, w, p, ms, mm = lact_scan_chunked(*unpack(flat), norms, position, C, muon)
        return (o, *w.values(), *mm.values())

    inputs = [*weights.values(), *((pending or {}).values()), *([m_sum] if position else []), *mom.values(),
              q, k, v, *lrs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    o_c = lact_scan_chunked(*unpack(inputs), norms, position, C, muon)[0]
    o_r = lact_scan_reference(*unpack(inputs), norms, position, C, muon)[0]
    assert (o_c - o_r).abs().max() <= 1e-10


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="lact", inner_optimizer="adamw"), "unknown inner_optimizer"),
    (dict(memory_layer="lact", hidden_size=64, num_attention_heads=4, lact_num_heads=3), "lact_num_heads"),
    (dict(memory_layer="lact", lact_chunk_size=0), "lact_chunk_size"),
])
def test_bad_lact_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)
