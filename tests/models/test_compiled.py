"""``torch.compile`` of a memory layer (the ``compiled`` implementation of bench.layer) equals eager:
outputs, final state and every gradient. The mini-batch / chunk loops run eagerly inside the
compiled graph (``torch.compiler.disable``); everything around them is compiled."""
import pytest
import torch

from models.layers.ttt import TTTLayer
from tests.models.helpers import perturb

pytestmark = pytest.mark.slow  # inductor compiles C++ on the CPU: ~20-60 s per layer


def _compare(layer, x, tol):
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    results = []
    for fn in (layer, compiled):
        y, state = fn(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        loss = (y * w).sum() + sum(t.square().sum() for t in state.tensors().values())
        results.append((y.detach(), state, torch.autograd.grad(loss, [x, *layer.parameters()])))
    (y0, s0, g0), (y1, s1, g1) = results
    assert (y1 - y0).abs().max() <= tol * max(1.0, y0.abs().max().item())
    for k, t in s0.tensors().items():
        assert (s1.tensors()[k] - t).abs().max() <= tol * max(1.0, t.abs().max().item()), k
    for (name, _), a, b in zip([("x", x), *layer.named_parameters()], g1, g0):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_compiled_ttt_equals_eager(inner):
    """5 full mini-batches and a tail of 3 (the tail runs the segment path, compiled)."""
    layer = perturb(TTTLayer(32, 4, inner=inner, mini_batch_size=4))
    x = torch.randn(2, 23, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    _compare(layer, x, 1e-5)

