"""The hand-written backward of the chunked TTT scan (models/ops/ttt/fused.py) = autograd of the reference."""
import pytest
import torch

from models.layers.ttt import TTTLayer
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



@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_strided_inputs_and_upstream_gradient(inner):
    """The scan takes q, k, v, lr and ∂L/∂o in any layout (under TP and CP they arrive as head slices
    and strided views): outputs and every gradient equal those of contiguous copies."""
    layer = perturb(TTTLayer(16, 2, inner=inner, mini_batch_size=4))
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(2, 16, 5, 8, generator=g).transpose(1, 2) for _ in range(3)]  # [B, 5 heads, T, d]
    lr_big = 0.1 * torch.rand(2, 16, 5, generator=g).transpose(1, 2)
    w = torch.randn(2, 2, 16, 8, generator=g)
    results = []
    for strided in (True, False):
        q, k, v = (t[:, 1:3] if strided else t[:, 1:3].contiguous() for t in big)
        lr = lr_big[:, 1:3] if strided else lr_big[:, 1:3].contiguous()
        q, k, v, lr = (t.detach().requires_grad_() for t in (q, k, v, lr))
        out, weights, _ = layer.scan_from(layer.init_state(2).weights, None, q, k, v, lr, 0)
        up = w.transpose(2, 3).contiguous().transpose(2, 3) if strided else w
        loss = (out * up).sum() + sum(t.square().sum() for t in weights.values())
        params = [p for n, p in layer.named_parameters() if n.startswith(("W", "b", "ttt_norm", "token_idx"))]
        results.append((out, torch.autograd.grad(loss, [q, k, v, lr, *params])))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
