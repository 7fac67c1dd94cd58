"""The hand-written backward of the chunked TTT scan (models/ttt_fused.py) = autograd of the reference."""
import pytest
import torch

from models.ttt import TTTLayer
from tests.models.helpers import perturb


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("group", [0, 2])
def test_fused_scan_gradients_equal_reference(inner, group):
    """5 full mini-batches + a partial one; every parameter's and the input's gradient against the
    token-by-token reference differentiated by autograd, with and without scan checkpointing."""
    layer = perturb(TTTLayer(32, 4, inner=inner, mini_batch_size=4, scan_checkpoint_group_size=group).double())
    x = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("chunk", "reference"):
        layer.scan_impl = impl
        y, state = layer(x)
        loss = (y * w).sum() + sum(t.square().sum() for t in state.weights.values())
        grads[impl] = torch.autograd.grad(loss, [x, *layer.parameters()])
    for (name, _), a, b in zip([("x", x), *layer.named_parameters()], grads["chunk"], grads["reference"]):
        assert (a - b).abs().max() <= 1e-8 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_recovered_weights_across_anchors(inner):
    """37 full mini-batches (anchors every 16: the backward undoes updates across two anchors):
    float64 gradients = the reference's, and float32 gradients stay within float32 noise of them."""
    layer = perturb(TTTLayer(16, 2, inner=inner, mini_batch_size=2).double())
    x = torch.randn(1, 75, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(1, 75, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl, dtype in (("chunk", torch.float64), ("reference", torch.float64), ("chunk", torch.float32)):
        layer.scan_impl = impl
        layer.to(dtype)
        xi = x.detach().to(dtype).requires_grad_()
        y, state = layer(xi)
        loss = (y * w.to(dtype)).sum() + sum(t.square().sum() for t in state.weights.values())
        grads[impl, dtype] = [g.double() for g in torch.autograd.grad(loss, [xi, *layer.parameters()])]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b, c in zip(names, grads["chunk", torch.float64], grads["reference", torch.float64],
                             grads["chunk", torch.float32]):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max() <= 1e-8 * scale, name
        assert (c - b).abs().max() <= 2e-5 * scale, name
