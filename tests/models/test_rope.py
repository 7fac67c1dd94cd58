"""Interleaved RoPE: the complex-product form (float32/float64) equals the real-arithmetic form."""
import pytest
import torch

from models.common.modules import apply_interleaved_rope, rope_cos_sin


def _real_form(x, cos, sin):
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_complex_rope_equals_real_form(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 16, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()  # [B, H, T, d] view
    cos, sin = rope_cos_sin(torch.arange(10) % 4, 16, 10000.0, dtype)
    w = torch.randn(2, 3, 10, 16, dtype=dtype, generator=g)
    y, y_ref = apply_interleaved_rope(x, cos, sin), _real_form(x, cos, sin)
    assert (y - y_ref).abs().max() <= tol
    (gx,), (gx_ref,) = torch.autograd.grad((y * w).sum(), x), torch.autograd.grad((y_ref * w).sum(), x)
    assert (gx - gx_ref).abs().max() <= tol


def test_rope_other_layouts_take_the_real_form():
    """bf16 (no complex bf16) and odd storage offsets fall back to the real form, same numbers."""
    x = torch.randn(3, 5, 9)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0, torch.float32)
    odd = x[..., 1:]  # storage offset 1: not viewable as complex
    assert torch.equal(apply_interleaved_rope(odd, cos, sin), _real_form(odd, cos, sin))
    xb = x[..., :8].bfloat16()
    cb, sb = cos.bfloat16(), sin.bfloat16()
    assert torch.equal(apply_interleaved_rope(xb, cb, sb), _real_form(xb, cb, sb))
