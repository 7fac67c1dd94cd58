"""ATLAS (Omega rule + polynomial features + Muon): chunked scan = token-by-token reference, one call
= any split, gradcheck, the feature map's kernel identity, the window really matters."""
import math

import pytest
import torch

from models import MemoryLMConfig
from models.layers.atlas import AtlasLayer
from models.ops.atlas.chunk import atlas_scan_chunked, poly_feature_dim, poly_features
from models.ops.atlas.naive import atlas_scan_reference
from models.hf.modeling_memory import build_mixer
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, run_pieces)

F64 = torch.float64
OPTIMIZERS = ["muon", "momentum", "sgd"]


def mixer(**kw):
    cfg = dict(hidden_size=16, num_attention_heads=2, memory_layer="atlas", atlas_chunk_size=4, atlas_window=3,
               num_hidden_layers=1, conv_kernel=3)
    cfg.update(kw)
    return perturb(build_mixer(MemoryLMConfig(**cfg), 0).to(F64))


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_polynomial_features_are_the_taylor_kernel(degree):
    """⟨φ(x), φ(y)⟩ = Σ_i a_i² (x·y)^i, with D = Σ_i C(d + i − 1, i) features."""
    d = 5
    x, y = torch.randn(2, 1, 1, 1, d, dtype=F64).unbind(0)
    coef = torch.rand(1, degree, dtype=F64) + 0.5
    fx, fy = poly_features(x, coef), poly_features(y, coef)
    assert fx.shape[-1] == poly_feature_dim(d, degree)
    dot = (x * y).sum()
    expected = sum(coef[0, i - 1] ** 2 * dot**i for i in range(1, degree + 1))
    assert torch.allclose((fx * fy).sum(), expected, atol=1e-12)
    layer = AtlasLayer(16, 2, poly_degree=degree)  # initial a_i² = 1/i!: the Taylor terms of exp(x·y)
    assert torch.allclose(layer.poly_coef[0] ** 2, torch.tensor([1 / math.factorial(i) for i in range(1, degree + 1)]))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("window", [1, 3])
def test_chunked_equals_reference_in_pieces(optimizer, window):
    layer = mixer(inner_optimizer=optimizer, atlas_window=window)
    x = torch.randn(2, 19, 16, dtype=F64)  # mid-chunk cuts, 4 full chunks + a partial one
    y, s = run_pieces(layer, x, [3, 9, 10])
    layer.scan_impl = "reference"
    y_ref, s_ref = run_pieces(layer, x, [3, 9, 10])
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5


def test_window_longer_than_the_chunk():
    layer = mixer(atlas_chunk_size=2, atlas_window=5)
    x = torch.randn(1, 11, 16, dtype=F64)
    y, s = layer(x)
    layer.scan_impl = "reference"
    y_ref, s_ref = layer(x)
    assert (y - y_ref).abs().max() <= 1e-5 and max_state_diff(s, s_ref) <= 1e-5


def test_the_window_changes_the_result():
    """c = 1 is the Titans-style one-token objective; a longer window gives another memory."""
    x = torch.randn(1, 9, 16, dtype=F64)
    y1, _ = mixer(atlas_window=1)(x)
    y3, s3 = mixer(atlas_window=3)(x)
    assert (y1 - y3).abs().max() > 1e-4
    assert s3.cache["k"].shape == (1, 2, 2, poly_feature_dim(8, 2))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_one_call_equals_k_pieces(optimizer, seed):
    cuts = {0: [2, 5, 13], 1: [7, 8]}[seed]
    check_one_call_equals_pieces(mixer(inner_optimizer=optimizer), torch.randn(2, 17, 16, dtype=F64), cuts)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradients_reach_every_parameter(optimizer):
    check_gradients_reach_every_parameter(mixer(inner_optimizer=optimizer), torch.randn(2, 11, 16, dtype=F64))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("position", [0, 3])
def test_gradcheck_atlas_scan(optimizer, position):
    g = torch.Generator().manual_seed(3)
    B, H, T, D, E, d, b, c = 1, 1, 5, 3, 2, 2, 4, 2

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    shapes = {"W1": (D, E), "W2": (E, d)}
    weights = {n: rnd(B, H, *s) for n, s in shapes.items()}
    anchor = {n: rnd(B, H, *s) for n, s in shapes.items()} if position else None
    mom = {n: rnd(B, H, *s, scale=0.1) for n, s in shapes.items()} if optimizer != "sgd" else None
    window = {"k": rnd(B, H, c - 1, D), "v": rnd(B, H, c - 1, d),
              "gamma": torch.rand(B, H, c - 1, generator=g, dtype=F64).requires_grad_()}
    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, d)
    gates = {n: (0.2 + 0.6 * torch.rand(B, H, T, generator=g, dtype=F64)).requires_grad_()
             for n in ("lr", "theta", "alpha", "gamma")}
    names = list(shapes)
    groups = [("w", 2), ("a", 2 if anchor else 0), ("m", 2 if mom else 0), ("win", 3), ("qkv", 3), ("g", 4)]

    def unpack(flat):
        out, i = {}, 0
        for name, n in groups:
            out[name], i = flat[i:i + n], i + n
        w = dict(zip(names, out["w"]))
        a = dict(zip(names, out["a"])) if anchor else None
        m = dict(zip(names, out["m"])) if mom else None
        win = dict(zip(("k", "v", "gamma"), out["win"]))
        return w, a, m, win, *out["qkv"], dict(zip(("lr", "theta", "alpha", "gamma"), out["g"]))

    def fn(*flat):
        o, w, a, m, win = atlas_scan_chunked(*unpack(flat), position, b, c, optimizer)
        return (o, *w.values(), *(m.values() if m else ()))

    inputs = [*weights.values(), *((anchor or {}).values()), *((mom or {}).values()), *window.values(), q, k, v,
              *gates.values()]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    o_c = atlas_scan_chunked(*unpack(inputs), position, b, c, optimizer)[0]
    o_r = atlas_scan_reference(*unpack(inputs), position, b, c, optimizer)[0]
    assert (o_c - o_r).abs().max() <= 1e-10


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="atlas", inner_optimizer="adam"), "unknown inner_optimizer"),
    (dict(memory_layer="atlas", atlas_window=0), "atlas_window"),
    (dict(memory_layer="atlas", atlas_poly_degree=5), "atlas_poly_degree"),
    (dict(memory_layer="atlas", atlas_chunk_size=0), "atlas_chunk_size"),
    (dict(memory_layer="atlas", atlas_base_lr=-1.0), "atlas_base_lr"),
])
def test_bad_atlas_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)


@pytest.mark.parametrize("optimizer,given,expected", [
    ("muon", None, 0.1), ("momentum", None, 1e-4), ("sgd", None, 1e-4), ("momentum", 0.02, 0.02)])
def test_base_lr_default_follows_the_inner_optimizer(optimizer, given, expected):
    """Muon's orthogonalised step has unit scale; the raw momentum/SGD step needs a 1000× smaller bound
    (issue 22: 0.1 is NaN at initialisation, 0.001 diverges after 31 steps at ``tiny``)."""
    cfg = MemoryLMConfig(hidden_size=64, num_attention_heads=4, memory_layer="atlas", inner_optimizer=optimizer,
                         atlas_base_lr=given)
    assert build_mixer(cfg, 0).base_lr == expected
    torch.manual_seed(0)
    layer = build_mixer(cfg, 0).train()
    x = torch.randn(2, 32, 64)
    y, _ = layer(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
