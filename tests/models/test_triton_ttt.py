"""The Triton chunk kernels of TTT-Linear and TTT-MLP (models/ops/ttt/triton.py) under TRITON_INTERPRET=1
on CPU, against the PyTorch chunked path: outputs, final weights and every gradient (fp32, ≤ 1e-4 relative
to the largest value).

Triton picks its interpreter when it is imported, so the checks run in one child process started
with TRITON_INTERPRET=1 (``python -m tests.models.test_triton_ttt`` prints them as JSON).
"""
import json
import os

import pytest
import torch

from models.ops.ttt import triton as triton_ttt
from tests.models.helpers import run_interpreted

TOL = 1e-4


def _inputs(dtype, N=3, B=1, H=2, b=16, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    W = rnd(B, H, d + 1, d, scale=0.3).detach().float().requires_grad_()
    q, k, tgt = rnd(N, B, H, b, d), rnd(N, B, H, b, d), rnd(N, B, H, b, d)
    lr = (0.1 * torch.rand(N, B, H, b, generator=g)).requires_grad_()
    scale = torch.rand(b, generator=g).requires_grad_()
    ln_w = (1 + 0.1 * torch.randn(H, 1, d, generator=g)).requires_grad_()
    ln_b = (0.1 * torch.randn(H, 1, d, generator=g)).requires_grad_()
    return [W, q, k, tgt, lr, scale, ln_w, ln_b]


def _mlp_inputs(N=3, B=1, H=2, b=16, d=16, h=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, q, k, tgt, lr, scale, ln_w, ln_b = _inputs(torch.float32, N, B, H, b, d, seed)
    W1 = (0.3 * torch.randn(B, H, d + 1, h, generator=g)).requires_grad_()
    W2 = (0.3 * torch.randn(B, H, h + 1, d, generator=g)).requires_grad_()
    return [W1, W2, q, k, tgt, lr, scale, ln_w, ln_b]


def _run_mlp(fused, W1, W2, q, k, tgt, lr, scale, ln_w, ln_b):
    from models.ops.ttt import chunk as ttt_chunk
    from models.ops.ttt.fused import mlp_scan

    eta = ttt_chunk._causal_eta(scale, lr)
    mix1 = eta * (q @ k.transpose(-1, -2) + 1.0)
    s_lr = (scale[-1] * lr)[..., None]
    if fused:  # the PyTorch scan returns the read-out q + LN(z̄) in token order, the kernels z̄
        z, w1, w2 = triton_ttt.triton_mlp_scan(W1, W2, q, k, tgt, eta, mix1, s_lr[..., 0], ln_w, ln_b)
        return ttt_chunk._tokens(ttt_chunk._read_out(q, z, ln_w, ln_b)), w1, w2
    return mlp_scan(W1, W2, k, q, tgt, eta, mix1, s_lr[..., 0], ln_w, ln_b)


def _run(fused, W, q, k, tgt, lr, scale, ln_w, ln_b):
    from models.ops.ttt import chunk as ttt_chunk
    from models.ops.ttt.fused import linear_scan

    q32, k32, t32 = q.float(), k.float(), tgt.float()
    mix = ttt_chunk._causal_eta(scale, lr) * (q32 @ k32.transpose(-1, -2) + 1.0)
    if fused:  # the PyTorch scan returns the read-out q + LN(z̄) in token order, the kernels z̄
        z, w = triton_ttt.triton_linear_scan(W, q, k, tgt, mix, scale[-1] * lr, ln_w, ln_b)
        return ttt_chunk._tokens(ttt_chunk._read_out(q32, z, ln_w, ln_b)), w
    return linear_scan(W, k32, q32, t32, mix, scale[-1] * lr, ln_w, ln_b)


def _err(a, b):
    """max |a − b| relative to max(1, max |b|)."""
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def _kernel_errors(dtype, N=3):
    """bf16 q, k, v − k: both paths read the same rounded values and compute in fp32. N = 37 crosses the
    weights kept every 16 mini-batches (the backward recovers the others)."""
    inputs = _inputs(dtype, N=N)
    res = {}
    for fused in (False, True):
        z, w = _run(fused, *inputs)
        gen = torch.Generator().manual_seed(5)
        loss = (z * torch.randn(z.shape, generator=gen)).sum() + (w * torch.randn(w.shape, generator=gen)).sum()
        res[fused] = (z, w, torch.autograd.grad(loss, inputs))
    (z0, w0, g0), (z1, w1, g1) = res[False], res[True]
    errs = {"out": _err(z1, z0), "weights": _err(w1, w0), "out_fp32": float(z1.dtype == torch.float32)}
    errs.update({f"d_{n}": _err(a, b) for n, a, b in zip("W q k tgt lr scale ln_w ln_b".split(), g1, g0)})
    errs["grad_dtypes_match"] = float(all(a.dtype == b.dtype for a, b in zip(g1, g0)))
    return errs


def _mlp_kernel_errors(N=3):
    inputs = _mlp_inputs(N=N)
    res = {}
    for fused in (False, True):
        outs = _run_mlp(fused, *inputs)
        gen = torch.Generator().manual_seed(5)
        loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in outs)
        res[fused] = (outs, torch.autograd.grad(loss, inputs))
    (o0, g0), (o1, g1) = res[False], res[True]
    errs = {n: _err(a, b) for n, a, b in zip(["out", "weights1", "weights2"], o1, o0)}
    errs.update({f"d_{n}": _err(a, b) for n, a, b in zip("W1 W2 q k tgt lr scale ln_w ln_b".split(), g1, g0)})
    return errs


def _layer_errors(inner="linear"):
    """A whole TTT layer (2 full mini-batches + a tail of 8) with the kernels selected
    (MEMTRAIN_TRITON=1) against the PyTorch path (=0): output, state, every gradient."""
    from models.layers.ttt import TTTLayer
    from tests.models.helpers import perturb

    torch.manual_seed(0)
    layer = perturb(TTTLayer(32, 2, inner=inner, mini_batch_size=16))  # head dim 16
    x = torch.randn(1, 40, 32, requires_grad=True)
    res = {}
    for flag in ("0", "1"):
        os.environ["MEMTRAIN_TRITON"] = flag
        y, state = layer(x)
        loss = y.square().sum() + sum(t.sum() for t in state.weights.values())
        res[flag] = (y, state.weights, torch.autograd.grad(loss, [x, *layer.parameters()]))
    errs = {"out": _err(res["1"][0], res["0"][0])}
    errs.update({f"state_{n}": _err(res["1"][1][n], res["0"][1][n]) for n in res["0"][1]})
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    errs.update({f"d_{n}": _err(a, b) for n, a, b in zip(names, res["1"][2], res["0"][2])})
    return errs


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("tests.models.test_triton_ttt")


@pytest.mark.parametrize("case", ["kernel_float32", "kernel_bfloat16", "kernel_long", "layer", "mlp_kernel",
                                  "mlp_kernel_long", "mlp_layer"])
def test_triton_matches_pytorch(interpreted, case):
    errs = interpreted[case]
    flags = {n: v for n, v in errs.items() if n in ("out_fp32", "grad_dtypes_match")}
    assert all(v == 1.0 for v in flags.values()), flags
    # gradients of bf16 inputs are bf16: the two paths round differently summed fp32 values (2 ulps)
    bf16_grads = ("d_q", "d_k", "d_tgt") if case == "kernel_bfloat16" else ()
    bad = {n: v for n, v in errs.items() if n not in flags and not v <= (2**-7 if n in bf16_grads else TOL)}
    assert not bad, bad
    assert len(errs) > 5  # outputs, weights and the gradients were all compared


def test_selection(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("MEMTRAIN_TRITON", raising=False)
    assert not triton_ttt.use_triton(x, 16, 64)  # CPU tensors: the PyTorch path
    monkeypatch.setenv("MEMTRAIN_TRITON", "1")
    assert triton_ttt.use_triton(x, 16, 64) == triton_ttt.AVAILABLE
    assert not triton_ttt.use_triton(x, 16, 24)  # tl.dot needs powers of two ≥ 16
    assert not triton_ttt.use_triton(x, 8, 64)
    assert not triton_ttt.use_triton(x.double(), 16, 64)  # fp32 kernels
    assert triton_ttt.use_triton(x, 16, 64, 256) == triton_ttt.AVAILABLE  # asked for: any tile
    assert not triton_ttt.use_triton(x, 16, 64, 96)
    monkeypatch.setenv("MEMTRAIN_TRITON", "0")
    assert not triton_ttt.use_triton(x, 16, 64)


if __name__ == "__main__":  # the child process of the `interpreted` fixture
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    out = {"kernel_float32": _kernel_errors(torch.float32), "kernel_bfloat16": _kernel_errors(torch.bfloat16),
           "kernel_long": _kernel_errors(torch.float32, N=37), "layer": _layer_errors(),
           "mlp_kernel": _mlp_kernel_errors(), "mlp_kernel_long": _mlp_kernel_errors(N=37),
           "mlp_layer": _layer_errors("mlp")}
    print(json.dumps(out))
