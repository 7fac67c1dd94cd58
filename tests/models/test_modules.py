"""Shared building blocks: the shifted causal conv = the grouped F.conv1d reference."""
import pytest
import torch
import torch.nn.functional as F

from models.common.modules import CausalConv1d, causal_conv1d_reference

F64 = torch.float64


def _max(t):
    return t.abs().max().item() if t.numel() else 0.0


@pytest.mark.parametrize("T", [1, 2, 3, 9])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("with_tail", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_equals_reference(T, K, with_tail, activation):
    """Output, new tail and the gradients of x, tail, weight and bias (float64, T < K − 1 included)."""
    g = torch.Generator().manual_seed(T + 10 * K)
    conv = CausalConv1d(5, K).double()
    x = torch.randn(2, T, 5, generator=g, dtype=F64, requires_grad=True)
    tail = torch.randn(2, 5, K - 1, generator=g, dtype=F64, requires_grad=True) if with_tail else None
    y, new_tail = conv(x, tail, activation=activation)
    ref = causal_conv1d_reference(x, tail, conv.weight, conv.bias)
    ref = F.silu(ref) if activation else ref
    full = torch.cat([tail if with_tail else x.new_zeros(2, 5, K - 1), x.transpose(1, 2)], -1)
    ref_tail = full[..., full.shape[-1] - (K - 1):]
    assert _max(y - ref) <= 1e-14 and _max(new_tail - ref_tail) == 0
    inputs = [x, conv.weight, conv.bias] + ([tail] if with_tail and K > 1 else [])
    w = torch.randn(y.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((y * w).sum() + new_tail.sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref * w).sum() + ref_tail.sum(), inputs, allow_unused=True)
    for a, b in zip(got, want):
        assert _max(a - b) <= 1e-13


def test_causal_conv_gradient_in_a_per_head_layout():
    """A gradient arriving as a per-head [B, H, T, d] layout (as from the scans) gives the same result."""
    conv = CausalConv1d(8, 4).double()
    x = torch.randn(1, 6, 8, dtype=F64, requires_grad=True)
    y, _ = conv(x, activation="silu")
    gy = torch.randn(1, 2, 6, 4, dtype=F64)  # [B, H, T, d]
    (a,) = torch.autograd.grad(y, x, gy.transpose(1, 2).flatten(2))
    (b,) = torch.autograd.grad(F.silu(causal_conv1d_reference(x, None, conv.weight, conv.bias)), x,
                               gy.transpose(1, 2).flatten(2).contiguous())
    assert _max(a - b) <= 1e-14


def test_causal_conv_under_bf16_autocast_returns_the_input_dtype():
    conv = CausalConv1d(8, 4)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, tail = conv(x, activation="silu")
    assert y.dtype == torch.bfloat16 and tail.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32


def test_causal_conv_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        CausalConv1d(4, 3)(torch.randn(1, 2, 4), activation="gelu")
