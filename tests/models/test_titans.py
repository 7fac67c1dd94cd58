"""Titans memory (chunked scans = token-by-token reference) and the MAC / MAG / MAL blocks."""
import pytest
import torch

from models import MemoryLMConfig
from models.modeling_memory import build_mixer
from models.titans import (TitansMemory, titans_coefficients, titans_coefficients_scan, titans_scan_chunked,
                           titans_scan_reference)
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, random_cuts)

F64 = torch.float64
KINDS = ["titans", "titans_mag", "titans_mal", "titans_mac"]


def mixer(kind, **kw):
    cfg = dict(hidden_size=32, num_attention_heads=4, memory_layer=kind, titans_chunk_size=4, titans_segment_size=8,
               num_persistent_tokens=2, num_hidden_layers=1, attention_window=5, conv_kernel=3)
    cfg.update(kw)
    return perturb(build_mixer(MemoryLMConfig(**cfg), 0).to(F64))


def memory_of(layer):
    return layer if isinstance(layer, TitansMemory) else layer.memory


def test_coefficients_equal_the_recurrences():
    """The impulse scans give the coefficients of M_t and S_t in (M₀, S₀, u_j)."""
    g = torch.Generator().manual_seed(0)
    n = 6
    lr, eta, alpha = (torch.rand(2, n, generator=g, dtype=F64) for _ in range(3))
    c, s_last, beta, f, m = titans_coefficients(lr, eta, alpha)
    # run the recurrences on scalars: M₀ = e_M, S₀ = e_S, u_j = e_j (a basis of n + 2 directions)
    M = torch.zeros(2, n + 2, dtype=F64)
    M[:, n] = 1
    S = torch.zeros(2, n + 2, dtype=F64)
    S[:, n + 1] = 1
    for t in range(n):
        u = torch.zeros(2, n + 2, dtype=F64)
        u[:, t] = 1
        S = eta[:, t, None] * S - lr[:, t, None] * u
        M = (1 - alpha[:, t, None]) * M + S
        assert (M[:, :n] - c[:, t]).abs().max() <= 1e-12
        assert (M[:, n] - beta[:, t]).abs().max() <= 1e-12 and (M[:, n + 1] - f[:, t]).abs().max() <= 1e-12
        assert (S[:, n + 1] - m[:, t]).abs().max() <= 1e-12
    assert (S[:, :n] - s_last).abs().max() <= 1e-12


@pytest.mark.parametrize("n", [1, 2, 7])
def test_closed_form_coefficients_equal_the_impulse_scans(n):
    """Values and gradients (lr, η, α) of the closed form = those of the impulse scans; η ≡ 0 (sgd) too."""
    g = torch.Generator().manual_seed(n)
    for eta_scale in (1.0, 0.0):
        lr, eta, alpha = (torch.rand(3, 2, n, generator=g, dtype=F64) for _ in range(3))
        eta = (eta * eta_scale).requires_grad_(eta_scale > 0)
        lr.requires_grad_(), alpha.requires_grad_()
        fast, ref = titans_coefficients(lr, eta, alpha), titans_coefficients_scan(lr, eta, alpha)
        ws = [torch.randn(t.shape, generator=g, dtype=F64) for t in ref]
        for a, b in zip(fast, ref):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-14
        inputs = [t for t in (lr, eta, alpha) if t.requires_grad]
        g_fast = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fast, ws)), inputs)
        g_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, ws)), inputs)
        for a, b in zip(g_fast, g_ref):
            assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("optimizer", ["momentum", "sgd"])
def test_memory_chunked_equals_reference(depth, optimizer):
    layer = mixer("titans", titans_memory_depth=depth, inner_optimizer=optimizer)
    x = torch.randn(2, 19, 32, dtype=F64)  # 4 full chunks + a partial one
    y, s = layer(x)
    layer.scan_impl = "reference"
    y_ref, s_ref = layer(x)
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_chunked_equal_reference_in_pieces(kind):
    layer = mixer(kind)
    x = torch.randn(2, 23, 32, dtype=F64)
    from tests.models.helpers import run_pieces
    y, s = run_pieces(layer, x, [3, 9, 10])
    memory_of(layer).scan_impl = "reference"
    y_ref, s_ref = run_pieces(layer, x, [3, 9, 10])
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_one_call_equals_k_pieces(kind, seed):
    T = 27
    check_one_call_equals_pieces(mixer(kind), torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    check_gradients_reach_every_parameter(mixer(kind), torch.randn(2, 13, 32, dtype=F64))


@pytest.mark.parametrize("position", [0, 3])
def test_gradcheck_titans_scan(position):
    g = torch.Generator().manual_seed(1)
    B, H, T, d, b = 1, 1, 6, 3, 4
    shapes = {"W1": (d, 4), "W2": (4, d)}

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    weights = {n: rnd(B, H, *s) for n, s in shapes.items()}
    anchor = {n: rnd(B, H, *s) for n, s in shapes.items()} if position % b else None
    mom = {n: rnd(B, H, *s, scale=0.1) for n, s in shapes.items()}
    q, k, v = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    lr, eta, alpha = (torch.rand(B, H, T, generator=g, dtype=F64).mul(0.5).requires_grad_() for _ in range(3))
    names = list(shapes)
    n_anchor = len(names) if anchor else 0

    def unpack(flat):
        w = dict(zip(names, flat[:2]))
        a = dict(zip(names, flat[2 : 2 + n_anchor])) if anchor else None
        m = dict(zip(names, flat[2 + n_anchor : 4 + n_anchor]))
        return (w, a, m, *flat[4 + n_anchor:])

    def fn(*flat):
        o, w, a, m = titans_scan_chunked(*unpack(flat), position, b)
        return (o, *w.values(), *m.values())

    inputs = [*weights.values(), *((anchor or {}).values()), *mom.values(), q, k, v, lr, eta, alpha]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    o_c = titans_scan_chunked(*unpack(inputs), position, b)[0]
    o_r = titans_scan_reference(*unpack(inputs), position, b)[0]
    assert (o_c - o_r).abs().max() <= 1e-10


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="titans", inner_optimizer="adam"), "unknown inner_optimizer"),
    (dict(memory_layer="titans_mac", titans_chunk_size=64, titans_segment_size=100), "multiple of titans_chunk_size"),
    (dict(memory_layer="titans", titans_memory_depth=0), "titans_memory_depth"),
    (dict(memory_layer="gated_deltanet", inner_optimizer="muon"), "unknown inner_optimizer"),
])
def test_bad_titans_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)
