"""(Gated) DeltaNet (WY chunks = token-by-token reference), attention mixers, the scan helper."""
import pytest
import torch

from models.common.attention import AttentionLayer, windowed_attention
from models.layers.deltanet import DeltaNetLayer
from models.ops.delta_rule.chunk import delta_rule_chunked
from models.ops.delta_rule.naive import delta_rule_reference
from models.common.parts import l2_normalize
from models.common.scan import linear_scan, torch_linear_scan
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, random_cuts)

F64 = torch.float64


def delta_layer(gated, chunk=8):
    return perturb(DeltaNetLayer(32, 4, gated=gated, chunk_size=chunk, conv_kernel=3).to(F64))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,chunk", [(29, 8), (16, 16), (5, 8), (33, 1)])
def test_delta_rule_chunked_equals_reference(gated, T, chunk):
    layer = delta_layer(gated, chunk)
    x = torch.randn(2, T, 32, dtype=F64)
    y, s = layer(x)
    layer.scan_impl = "reference"
    y_ref, s_ref = layer(x)
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_kernel_equals_reference_raw(gated):
    """The bare recurrences (no layer norms in the way), from a non-zero state."""
    g = torch.Generator().manual_seed(3)
    B, H, T, d = 2, 3, 21, 6
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=F64) for _ in range(3))
    k = l2_normalize(k)
    beta = torch.rand(B, H, T, generator=g, dtype=F64)
    log_alpha = -torch.rand(B, H, T, generator=g, dtype=F64) if gated else None
    S = torch.randn(B, H, d, d, generator=g, dtype=F64)
    for chunk in (1, 4, 8, 64):
        o, S1 = delta_rule_chunked(q, k, v, beta, log_alpha, S, chunk)
        o_ref, S_ref = delta_rule_reference(q, k, v, beta, log_alpha, S)
        assert (o - o_ref).abs().max() <= 1e-10 and (S1 - S_ref).abs().max() <= 1e-10


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_one_call_equals_k_pieces(gated, seed):
    layer = delta_layer(gated)
    T = 37
    check_one_call_equals_pieces(layer, torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


@pytest.mark.parametrize("gated", [False, True])
def test_delta_gradients_reach_every_parameter(gated):
    check_gradients_reach_every_parameter(delta_layer(gated), torch.randn(2, 19, 32, dtype=F64))


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_delta_rule_chunked(gated):
    g = torch.Generator().manual_seed(1)
    B, H, T, d = 1, 1, 6, 3

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    q, k, v, S = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, d, d)
    beta = torch.rand(B, H, T, generator=g, dtype=F64).requires_grad_()
    la = (-torch.rand(B, H, T, generator=g, dtype=F64)).requires_grad_() if gated else None
    inputs = [q, k, v, beta, S] + ([la] if gated else [])

    def fn(q, k, v, beta, S, la=None):
        return delta_rule_chunked(q, k, v, beta, la, S, 4)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ attention


def naive_attention(q, k, v, window, prefix_k=None, prefix_v=None):
    T = q.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if prefix_k is not None:
        scores = torch.cat([(q @ prefix_k.transpose(-1, -2)) / q.shape[-1] ** 0.5, scores], -1)
        mask = torch.cat([torch.ones(T, prefix_k.shape[2], dtype=torch.bool), mask], -1)
        v = torch.cat([prefix_v, v], 2)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("persistent", [0, 3])
def test_blocked_attention_equals_dense(window, persistent):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 23, 8, generator=g, dtype=F64) for _ in range(3))
    pk = pv = None
    if persistent:
        pk, pv = (torch.randn(2, 3, persistent, 8, generator=g, dtype=F64) for _ in range(2))
    out = windowed_attention(q, k, v, 0, 0, window, pk, pv, block=4)
    assert (out - naive_attention(q, k, v, window, pk, pv)).abs().max() <= 1e-10


@pytest.mark.parametrize("window,persistent", [(None, 0), (4, 0), (7, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_one_call_equals_k_pieces(window, persistent, seed):
    layer = perturb(AttentionLayer(32, 4, window=window, num_persistent=persistent, block_size=8).to(F64))
    T = 30
    check_one_call_equals_pieces(layer, torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


def test_attention_state_keeps_only_the_window():
    layer = AttentionLayer(32, 4, window=5)
    _, s = layer(torch.randn(1, 12, 32))
    assert s.cache["k"].shape[2] == 4 and s.position == 12
    _, s = layer(torch.randn(1, 2, 32), s)
    assert s.cache["k"].shape[2] == 4 and s.position == 14
    _, s = AttentionLayer(32, 4)(torch.randn(1, 12, 32))
    assert s.cache["k"].shape[2] == 12


def test_attention_gradients_reach_every_parameter():
    layer = perturb(AttentionLayer(32, 4, window=4, num_persistent=2).to(F64))
    check_gradients_reach_every_parameter(layer, torch.randn(2, 9, 32, dtype=F64))


# ------------------------------------------------------------------------------ the scan


@pytest.mark.parametrize("T", [1, 7, 16, 33])
def test_torch_scan_equals_sequential_and_accelerated_scan(T):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(2, 5, T, generator=g, dtype=F64)
    x = torch.randn(2, 5, T, generator=g, dtype=F64)
    h, seq = torch.zeros(2, 5, dtype=F64), []
    for t in range(T):
        h = a[..., t] * h + x[..., t]
        seq.append(h)
    expected = torch.stack(seq, -1)
    assert (torch_linear_scan(a, x) - expected).abs().max() <= 1e-12
    assert (linear_scan(a, x) - expected).abs().max() <= 1e-12
    ref = pytest.importorskip("accelerated_scan.ref")
    if T > 1:  # its reference cannot take a length-1 sequence
        assert (ref.scan(a.contiguous(), x.contiguous()) - torch_linear_scan(a, x)).abs().max() <= 1e-12


def test_bad_delta_configuration():
    with pytest.raises(ValueError, match="not divisible"):
        DeltaNetLayer(30, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        DeltaNetLayer(32, 4, chunk_size=0)
    with pytest.raises(ValueError, match="window"):
        AttentionLayer(32, 4, window=0)
