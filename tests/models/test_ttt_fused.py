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
