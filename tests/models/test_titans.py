"""Titans memory (chunked scans = token-by-token reference) and the MAC / MAG / MAL blocks."""
import pytest
import torch

from models import MemoryLMConfig
from models.hf.modeling_memory import build_mixer
from models.layers.titans import TitansMemory
from models.ops.titans.chunk import (_segment, _whole_chunks, decay_products, titans_coefficients,
                                     titans_coefficients_scan, titans_scan_chunked)
from models.ops.titans.naive import decay_products_reference, titans_scan_reference
from models.ops.titans.fused import TitansChunkScan, gelu_parts
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


def test_decay_products_equal_reference_and_gradcheck():
    """Π_{j<i≤t} g_i: values and the hand-written backward (finite differences; a zero gate included)."""
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(2, 3, 6, generator=g, dtype=F64)
    gates[0, 1, 2] = 0.0
    assert (decay_products(gates) - decay_products_reference(gates)).abs().max() <= 1e-15
    assert torch.autograd.gradcheck(decay_products, gates.requires_grad_())
    w = torch.randn(2, 3, 6, 6, generator=g, dtype=F64)
    (a,) = torch.autograd.grad((decay_products(gates) * w).sum(), gates)
    (b,) = torch.autograd.grad((decay_products_reference(gates) * w).sum(), gates)
    assert (a - b).abs().max() <= 1e-14


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


def _scan_inputs(g, B, H, T, dims, momentum, position=0, b=4):
    """Random weights (anchor when mid-chunk), momentum, q, k, v and gates in (0, ½), float64, all leaves."""
    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    names = [f"W{i + 1}" for i in range(len(dims) - 1)]
    weights = {n: rnd(B, H, dims[i], dims[i + 1]) for i, n in enumerate(names)}
    anchor = {n: rnd(B, H, dims[i], dims[i + 1]) for i, n in enumerate(names)} if position % b else None
    mom = {n: rnd(B, H, dims[i], dims[i + 1], scale=0.1) for i, n in enumerate(names)} if momentum else None
    q, k, v = (rnd(B, H, T, dims[0]) for _ in range(3))
    gates = [torch.rand(B, H, T, generator=g, dtype=F64).mul(0.5).requires_grad_() for _ in range(3)]
    return weights, anchor, mom, q, k, v, gates


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("tau", [None, 1.0, 0.05])
def test_fused_whole_chunks_equal_autograd_of_segments(depth, momentum, tau):
    """ops.titans.fused.TitansChunkScan (hand-written backward) = autograd through one _segment per chunk:
    outputs, memory after the chunks and the gradients of every input (float64)."""
    g = torch.Generator().manual_seed(depth + 10 * momentum)
    N, B, H, b, d = 3, 2, 2, 4, 3
    dims = [d] + [5] * (depth - 1) + [d]
    weights, _, mom, q, k, v, (lr, eta, alpha) = _scan_inputs(g, B, H, N * b, dims, momentum)
    cur, mo = list(weights.values()), (list(mom.values()) if momentum else None)
    blocks = (lambda t: t.unflatten(2, (N, b)).movedim(2, 0))
    eta_ = eta if momentum else torch.zeros_like(eta)

    def fused():
        o, w, m = _whole_chunks(cur, mo, *(blocks(t) for t in (q, k, v)),
                                titans_coefficients(*(blocks(t) for t in (lr, eta_, alpha))), tau)
        return [o, *w, *(m or [])]

    def segments():
        coeffs = titans_coefficients(*(blocks(t) for t in (lr, eta_, alpha)))
        w, m, outs = cur, mo, []
        for i in range(N):
            o, w, m = _segment(w, w, m, *(blocks(t)[i] for t in (q, k, v)), [t[i] for t in coeffs], tau)
            outs.append(o)
        return [torch.cat(outs, 2), *w, *(m or [])]

    a, r = fused(), segments()
    inputs = [q, k, v, lr, alpha, *cur, *(mo or [])] + ([eta] if momentum else [])
    ws = [torch.randn(t.shape, generator=g, dtype=F64) for t in r]
    g_a = torch.autograd.grad(sum((t * w).sum() for t, w in zip(a, ws)), inputs)
    g_r = torch.autograd.grad(sum((t * w).sum() for t, w in zip(r, ws)), inputs)
    for x, y in zip(a + list(g_a), r + list(g_r)):
        assert (x - y).abs().max() <= 1e-10 * (1 + y.abs().max())


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("tau", [None, 0.3])
def test_gradcheck_fused_chunk_scan(momentum, tau):
    """The hand-written backward of TitansChunkScan against finite differences (every input, depth 2)."""
    g = torch.Generator().manual_seed(3)
    N, BH, b, d, h = 2, 2, 3, 2, 3

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    coef = [rnd(N, BH, b, 1) for _ in range(4 if momentum else 2)]  # beta, c_last (, f, s_last)
    lasts = [rnd(N, BH, 1, 1) for _ in range(3 if momentum else 1)]
    inputs = [rnd(N, BH, b, d), rnd(N, BH, b, d), rnd(N, BH, b, d), rnd(N, BH, b, b), rnd(N, BH, b, b)]
    states = [rnd(BH, d, h), rnd(BH, h, d)] + ([rnd(BH, d, h, scale=0.2), rnd(BH, h, d, scale=0.2)] if momentum else [])

    def fn(*flat):
        q, k, v, qk, c = flat[:5]
        cf = flat[5:5 + len(coef)]
        beta, c_last = cf[0], cf[1]
        f, s_last = (cf[2], cf[3]) if momentum else (None, None)
        ls = flat[5 + len(coef):5 + len(coef) + len(lasts)]
        beta_last, f_last, m_last = (ls[0], ls[1], ls[2]) if momentum else (ls[0], None, None)
        return TitansChunkScan.apply(tau, True, q, k, v, qk, c, beta, f, c_last, s_last, beta_last, f_last, m_last,
                                     *flat[5 + len(coef) + len(lasts):])

    assert torch.autograd.gradcheck(fn, inputs + coef + lasts + states, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fused_scan_without_grad_gives_the_same_outputs():
    """Inference (nothing kept for a backward) = training forward."""
    g = torch.Generator().manual_seed(5)
    weights, _, mom, q, k, v, gates = _scan_inputs(g, 1, 2, 12, [3, 5, 3], True)
    args = (weights, None, mom, q, k, v, *gates, 0, 4, 0.5)
    with torch.no_grad():
        o, w, _, m = titans_scan_chunked(*args)
    o2, w2, _, m2 = titans_scan_chunked(*args)
    assert (o - o2).abs().max() == 0 and all((w[n] - w2[n]).abs().max() == 0 for n in w)


def test_gelu_parts_are_the_tanh_gelu_and_its_derivatives():
    x = torch.linspace(-6, 6, 241, dtype=F64).requires_grad_()
    g, g1, g2 = gelu_parts(x, 2)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    assert (gelu_parts(x, 0)[0] - g).abs().max() == 0 and (gelu_parts(x, 1)[1] - g1).abs().max() == 0
    (r1,) = torch.autograd.grad(ref.sum(), x, create_graph=True)
    (r2,) = torch.autograd.grad(r1.sum(), x)
    assert (g - ref).abs().max() <= 1e-14 and (g1 - r1).abs().max() <= 1e-14 and (g2 - r2).abs().max() <= 1e-13


@pytest.mark.parametrize("position", [0, 2, 5])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum", [True, False])
def test_chunked_gradients_equal_reference(position, depth, momentum):
    """titans_scan_chunked = titans_scan_reference with a head, several whole chunks (the fused scan) and
    a tail: outputs, state and the gradients of every input (float64, soft clamp on)."""
    g = torch.Generator().manual_seed(position + 7 * depth)
    B, H, T, d, b = 1, 2, 15, 3, 4
    dims = [d] + [4] * (depth - 1) + [d]
    weights, anchor, mom, q, k, v, (lr, eta, alpha) = _scan_inputs(g, B, H, T, dims, momentum, position, b)
    args = (weights, anchor, mom, q, k, v, lr, eta, alpha, position, b, 0.5)
    res_c, res_r = titans_scan_chunked(*args), titans_scan_reference(*args)
    outs_c = [res_c[0], *res_c[1].values(), *(res_c[3] or {}).values()]
    outs_r = [res_r[0], *res_r[1].values(), *(res_r[3] or {}).values()]
    inputs = [q, k, v, lr, alpha, *weights.values(), *(anchor or {}).values(), *(mom or {}).values()]
    inputs += [eta] if momentum else []
    ws = [torch.randn(t.shape, generator=g, dtype=F64) for t in outs_r]
    g_c = torch.autograd.grad(sum((t * w).sum() for t, w in zip(outs_c, ws)), inputs)
    g_r = torch.autograd.grad(sum((t * w).sum() for t, w in zip(outs_r, ws)), inputs)
    for x, y in zip(outs_c + list(g_c), outs_r + list(g_r)):
        assert (x - y).abs().max() <= 1e-9


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="titans", inner_optimizer="adam"), "unknown inner_optimizer"),
    (dict(memory_layer="titans_mac", titans_chunk_size=64, titans_segment_size=100), "multiple of titans_chunk_size"),
    (dict(memory_layer="titans", titans_memory_depth=0), "titans_memory_depth"),
    (dict(memory_layer="gated_deltanet", inner_optimizer="muon"), "unknown inner_optimizer"),
])
def test_bad_titans_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)
