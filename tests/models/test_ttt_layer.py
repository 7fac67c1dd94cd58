"""TTT layer: chunked dual form = token-by-token reference, state splitting, gradients."""
import itertools

import pytest
import torch

from models.ops.ttt.naive import ttt_scan_reference
from models.layers.ttt import TTTLayer
from models.ops.ttt.chunk import ttt_scan_chunked
from tests.models.helpers import max_state_diff, run_pieces

INNERS = ["linear", "mlp"]
OPTIONS = [dict(), dict(share_qk=True, use_gate=True, conv_kernel=3)]


def make_layer(inner, mini_batch=8, hidden=32, heads=4, dtype=torch.float64, **kw):
    layer = TTTLayer(hidden, heads, inner=inner, mini_batch_size=mini_batch, **kw).to(dtype)
    with torch.no_grad():  # move every parameter off its init so no term is trivially zero
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("inner,opts", list(itertools.product(INNERS, OPTIONS)))
def test_chunked_equals_reference(inner, opts):
    layer = make_layer(inner, **opts)
    x = torch.randn(2, 29, 32, dtype=torch.float64)  # 3 full mini-batches + a partial one
    y_chunk, s_chunk = layer(x)
    layer.scan_impl = "reference"
    y_ref, s_ref = layer(x)
    assert (y_chunk - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s_chunk, s_ref) <= 1e-5


@pytest.mark.parametrize("inner,opts", list(itertools.product(INNERS, OPTIONS)))
def test_pieces_from_mid_mini_batch_equal_reference(inner, opts):
    """Head (finishing a mini-batch another call began) + body + tail against the reference."""
    layer = make_layer(inner, **opts)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    cuts = [5, 6, 27]
    y_chunk, s_chunk = run_pieces(layer, x, cuts)
    layer.scan_impl = "reference"
    y_ref, s_ref = run_pieces(layer, x, cuts)
    assert (y_chunk - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s_chunk, s_ref) <= 1e-5


@pytest.mark.parametrize("inner,opts", list(itertools.product(INNERS, OPTIONS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_call_equals_k_pieces(inner, opts, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(inner, **opts)
    T = 45
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    k = int(torch.randint(2, 6, (), generator=gen))
    cuts = sorted(torch.randperm(T - 1, generator=gen)[: k - 1].add(1).tolist())
    y_one, s_one = layer(x)
    y_k, s_k = run_pieces(layer, x, cuts)
    assert (y_one - y_k).abs().max() <= 1e-5, cuts
    assert max_state_diff(s_one, s_k) <= 1e-5
    # the state carries gradients across the cut, too
    w = torch.randn_like(y_one)
    g_one = torch.autograd.grad((y_one * w).sum(), [x, *layer.parameters()], allow_unused=True)
    g_k = torch.autograd.grad((y_k * w).sum(), [x, *layer.parameters()], allow_unused=True)
    for a, b in zip(g_one, g_k):
        if a is not None:
            assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("inner,opts", list(itertools.product(INNERS, OPTIONS)))
def test_gradients_reach_every_parameter(inner, opts):
    layer = make_layer(inner, **opts)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    y, _ = layer(x)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("position", [0, 3])
def test_gradcheck_chunked_scan(inner, position):
    B, H, T, d, b = 1, 2, 7, 4, 4
    shapes = {"W1": (d, d), "b1": (1, d)} if inner == "linear" else {
        "W1": (d, 2 * d), "b1": (1, 2 * d), "W2": (2 * d, d), "b2": (1, d)}
    g = torch.Generator().manual_seed(1)

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()

    anchor = {n: rnd(B, H, *s) for n, s in shapes.items()}
    pending = {n: rnd(B, H, *s, scale=0.1) for n, s in shapes.items()} if position % b else None
    q, k, v = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64).mul(0.3).requires_grad_()
    offset, ln_w, ln_b = rnd(b, scale=0.1), (1 + rnd(H, d, scale=0.1)).detach().requires_grad_(), rnd(H, d, scale=0.1)
    names = list(shapes)

    def fn(*flat):
        an = dict(zip(names, flat[: len(names)]))
        rest = flat[len(names):]
        if pending is not None:
            pe, rest = dict(zip(names, rest[: len(names)])), rest[len(names):]
        else:
            pe = None
        q_, k_, v_, lr_, off_, w_, b_ = rest
        out, a2, p2 = ttt_scan_chunked(inner, an, pe, q_, k_, v_, lr_, off_, w_, b_, position, b)
        return (out, *a2.values(), *((p2 or {}).values()))

    inputs = [*anchor.values(), *((pending or {}).values()), q, k, v, lr, offset, ln_w, ln_b]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    # and the reference agrees with the chunked form on these inputs
    out_c = ttt_scan_chunked(inner, anchor, pending, q, k, v, lr, offset, ln_w, ln_b, position, b)[0]
    out_r = ttt_scan_reference(inner, anchor, pending, q, k, v, lr, offset, ln_w, ln_b, position, b)[0]
    assert (out_c - out_r).abs().max() <= 1e-5


@pytest.mark.parametrize("inner", INNERS)
def test_scan_checkpointing_gives_same_gradients(inner):
    layer = make_layer(inner).train()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    grads = []
    for group in (0, 2):
        layer.zero_grad()
        layer.scan_checkpoint_group_size = group
        y, _ = layer(x)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10


def test_bfloat16_activations_keep_float32_state():
    layer = make_layer("linear", dtype=torch.float32).to(torch.bfloat16)
    y, state = layer(torch.randn(1, 20, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert all(t.dtype == torch.float32 for t in state.weights.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=30, num_heads=4), "not divisible"),
    (dict(hidden_size=36, num_heads=4), "even"),
    (dict(hidden_size=32, num_heads=4, inner="swiglu"), "unknown inner model"),
    (dict(hidden_size=32, num_heads=4, scan_impl="fast"), "unknown scan_impl"),
])
def test_bad_layer_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTTLayer(**kwargs)
