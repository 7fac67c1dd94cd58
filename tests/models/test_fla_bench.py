"""bench.layer --impls fla (bench/fla_ops.py) on CPU, where fla's Triton kernels cannot run: the same mixers
with fla's PyTorch references. fla's DeltaNet / Gated DeltaNet op equals this project's delta rule at the
same inputs (so the GPU comparison times the same math), and every fla mixer runs forward and backward.
Skipped when flash-linear-attention is not installed (``pip install -e .[bench]``)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fla")

from bench import fla_ops  # noqa: E402
from models.ops.delta_rule.chunk import delta_rule_chunked  # noqa: E402


@pytest.mark.parametrize("layer", ["deltanet", "gated_deltanet"])
def test_fla_delta_rule_is_ours(layer):
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 1, 128, 2, 16
    q, k, v = (torch.randn(B, T, H, d, generator=g) for _ in range(3))
    s = torch.randn(B, T, H, fla_ops.SCALARS[layer], generator=g)
    theirs = fla_ops.op(layer, kernel=False)(q, k, v, s, None, None)
    qh, kh, vh, sh = (t.transpose(1, 2) for t in (q, k, v, s))
    log_alpha = -F.softplus(sh[..., 0]) if layer == "gated_deltanet" else None
    beta = sh[..., 1 if layer == "gated_deltanet" else 0].sigmoid()
    ours, _ = delta_rule_chunked(F.normalize(qh, dim=-1) * d**-0.5, F.normalize(kh, dim=-1), vh, beta, log_alpha,
                                 q.new_zeros(B, H, d, d), 32)
    assert theirs.shape == (B, T, H, d)
    torch.testing.assert_close(theirs, ours.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", fla_ops.LAYERS)
def test_fla_mixer_forward_backward(layer):
    from bench.layer import FLA_LAYERS

    assert layer in FLA_LAYERS
    torch.manual_seed(0)
    mixer = fla_ops.build(layer, 32, 2, torch.device("cpu"))
    x = torch.randn(1, 64, 32, requires_grad=True)
    y = mixer(x)
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    grads = [x.grad, mixer.qkv.weight.grad, mixer.scalars.weight.grad]
    assert all(t is not None and torch.isfinite(t).all() and t.abs().sum() > 0 for t in grads)
    with pytest.raises(ValueError, match="multiple of its chunk"):
        mixer(torch.randn(1, 65, 32))
