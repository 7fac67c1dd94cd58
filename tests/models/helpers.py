"""Shared helpers of the layer tests: perturbed layers, piecewise runs, state comparison, the Triton
interpreter's child process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(module: str) -> dict:
    """``python -m module`` with TRITON_INTERPRET=1 (the Triton kernels run on the CPU; triton picks its
    interpreter when imported, hence a child process) → the JSON dict it prints last."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton: its CPU interpreter runs these)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def perturb(module, scale=0.1, seed=0):
    """Moves every parameter off its init so no term is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def run_pieces(layer, x, cuts):
    state, ys = None, []
    bounds = [0, *cuts, x.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, 1), state


def max_state_diff(s1, s2):
    t1, t2 = s1.tensors(), s2.tensors()
    assert t1.keys() == t2.keys(), (sorted(t1), sorted(t2))
    assert s1.position == s2.position
    return max([0.0] + [(t1[k] - t2[k]).abs().max().item() for k in t1])


def random_cuts(T, seed, k_max=5):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, k_max + 1, (), generator=gen))
    return sorted(torch.randperm(T - 1, generator=gen)[: k - 1].add(1).tolist())


def check_one_call_equals_pieces(layer, x, cuts, tol=1e-5):
    """Outputs, final state and all gradients (input and parameters) agree."""
    x = x.detach().requires_grad_()
    y_one, s_one = layer(x)
    y_k, s_k = run_pieces(layer, x, cuts)
    assert (y_one - y_k).abs().max() <= tol, cuts
    assert max_state_diff(s_one, s_k) <= tol, cuts
    w = torch.randn_like(y_one)
    params = [p for p in layer.parameters() if p.requires_grad]
    g_one = torch.autograd.grad((y_one * w).sum(), [x, *params], allow_unused=True)
    g_k = torch.autograd.grad((y_k * w).sum(), [x, *params], allow_unused=True)
    for a, b in zip(g_one, g_k):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= tol, cuts


def check_gradients_reach_every_parameter(layer, x):
    y, _ = layer(x)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
