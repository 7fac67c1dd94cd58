"""TNT (models/layers/tnt.py): chunked = token-by-token reference, one call = pieces, gradcheck, resets,
and the two-stage recipe (a model trained with one local chunk size runs with another)."""
import pytest
import torch

from models import MemoryLMConfig, MemoryLMForCausalLM, preset_config
from models.hf.modeling_memory import build_mixer
from models.ops.titans.chunk import titans_coefficients
from models.layers.tnt import TNTLayer
from models.ops.tnt.chunk import chunk_end_coefficients, tnt_scan_chunked
from models.ops.tnt.naive import tnt_scan_reference
from models.common.state import LayerState
from tests.models.helpers import (check_gradients_reach_every_parameter, check_one_call_equals_pieces, max_state_diff,
                                  perturb, random_cuts, run_pieces)

F64 = torch.float64


def mixer(**kw):
    cfg = dict(hidden_size=32, num_attention_heads=4, memory_layer="tnt", num_hidden_layers=1, conv_kernel=3,
               tnt_global_chunk_size=8, tnt_local_chunk_sizes=[2, 4], tnt_reset_period=8)
    cfg.update(kw)
    return perturb(build_mixer(MemoryLMConfig(**cfg), 0).to(F64))


def test_chunk_end_coefficients_are_the_last_row():
    g = torch.Generator().manual_seed(0)
    lr, eta, alpha = (torch.rand(3, 7, generator=g, dtype=F64) for _ in range(3))
    c, s_last, beta, f, m = titans_coefficients(lr, eta, alpha)
    c_n, f_n, beta_n, s_n, m_n = chunk_end_coefficients(lr, eta, alpha)
    for a, b in [(c[..., -1, :], c_n), (f[..., -1], f_n), (beta[..., -1], beta_n), (s_last, s_n), (m[..., -1], m_n)]:
        assert (a - b).abs().max() <= 1e-14


@pytest.mark.parametrize("kw", [
    dict(),                                                                  # reset = global chunk
    dict(inner_optimizer="sgd", titans_memory_depth=1),
    dict(tnt_global_chunk_size=6, tnt_local_chunk_sizes=[4], tnt_reset_period=4, titans_memory_depth=3),
])
def test_chunked_equals_reference_in_pieces(kw):
    layer = mixer(**kw)
    x = torch.randn(2, 29, 32, dtype=F64)  # several reset segments, partial chunks at both ends
    for cuts in ([], [3, 11, 20]):
        layer.scan_impl = "chunk"
        y, s = run_pieces(layer, x, cuts)
        layer.scan_impl = "reference"
        y_ref, s_ref = run_pieces(layer, x, cuts)
        assert (y - y_ref).abs().max() <= 1e-5
        assert max_state_diff(s, s_ref) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_one_call_equals_k_pieces(seed):
    T = 27
    check_one_call_equals_pieces(mixer(), torch.randn(2, T, 32, dtype=F64), random_cuts(T, seed))


def test_gradients_reach_every_parameter():
    check_gradients_reach_every_parameter(mixer(), torch.randn(2, 13, 32, dtype=F64))


def test_local_memories_forget_at_a_reset():
    """With the global chunk longer than the sequence the global memory is read at its initial
    weights, so after a reset (and the conv's kernel − 1 tokens) nothing earlier is visible."""
    layer = mixer(tnt_global_chunk_size=64, tnt_reset_period=8)
    x = torch.randn(1, 16, 32, dtype=F64)
    x2 = x.clone()
    x2[:, :6] += 1.0  # tokens 0..5; the conv (kernel 3) reaches back to token 6 from token 8
    y, y2 = layer(x)[0], layer(x2)[0]
    assert (y[:, 8:] - y2[:, 8:]).abs().max() <= 1e-12
    assert (y[:, 6:8] - y2[:, 6:8]).abs().max() > 1e-3  # but inside the segment it is


@pytest.mark.parametrize("position", [0, 3])
def test_gradcheck_tnt_scan(position):
    g = torch.Generator().manual_seed(1)
    B, H, T, d = 1, 1, 7, 2
    shapes = {"W1": (d, 3), "W2": (3, d)}

    def rnd(*s, scale=0.5):
        return (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()

    def memory(anchor):
        return [rnd(B, H, *s) for s in shapes.values()], ([rnd(B, H, *s) for s in shapes.values()] if anchor else []), \
            [rnd(B, H, *s, scale=0.1) for s in shapes.values()]

    mid = position % 2 != 0
    glob, loc = memory(position % 4 != 0), memory(mid)
    P = rnd(B, H, d, d, scale=0.3)
    init = [rnd(B, H, *s) for s in shapes.values()]
    q, k, v = rnd(B, H, T, d), rnd(B, H, T, d), rnd(B, H, T, d)
    gates = [torch.rand(B, H, T, generator=g, dtype=F64).mul(0.5).requires_grad_() for _ in range(6)]
    flat = [*glob[0], *glob[1], *glob[2], *loc[0], *loc[1], *loc[2], P, *init, q, k, v, *gates]
    sizes = [len(t) for t in (*glob, *loc)]

    def unpack(args):
        args, parts = list(args), []
        for n in sizes:
            parts.append(dict(zip(shapes, args[:n])) if n else None)
            args = args[n:]

        def st(w, a, m):
            return LayerState(weights=w, anchor=a, opt={"momentum": m})

        P_, i1, i2, q_, k_, v_, *gs = args
        return (st(*parts[:3]), [st(*parts[3:])], P_, [dict(zip(shapes, (i1, i2)))], q_, k_, v_,
                [tuple(gs[:3]), tuple(gs[3:])], position, 4, [2], 4)

    def fn(*args):
        o, gl, locs, P_ = tnt_scan_chunked(*unpack(args))
        return (o, *gl.tensors().values(), *locs[0].tensors().values(), P_)

    assert torch.autograd.gradcheck(fn, flat, eps=1e-6, atol=1e-5, rtol=1e-4)
    o_c = tnt_scan_chunked(*unpack(flat))[0]
    o_r = tnt_scan_reference(*unpack(flat))[0]
    assert (o_c - o_r).abs().max() <= 1e-10


def test_two_stage_local_chunk_size(tmp_path):
    """Stage 1 with large local chunks, stage 2 loads the same weights with smaller ones."""
    torch.manual_seed(0)
    cfg = preset_config("test", memory_layer="tnt", tnt_global_chunk_size=16, tnt_local_chunk_sizes=[8],
                        tnt_reset_period=16)
    model = MemoryLMForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    fine = MemoryLMForCausalLM.from_pretrained(tmp_path, tnt_local_chunk_sizes=[2])
    assert fine.config.tnt_local_chunk_sizes == [2] and fine.model.layers[0].mixer.local_chunk_sizes == [2]
    for (n, p), (n2, p2) in zip(model.state_dict().items(), fine.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    ids = torch.randint(0, 128, (2, 20))
    out1, out2 = model(ids, labels=ids), fine(ids, labels=ids)
    assert torch.isfinite(out2.loss)
    assert (out1.logits - out2.logits).abs().max() > 1e-6  # a different frozen-gradient scope
    out2.loss.backward()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tnt_local_chunk_sizes=[3], tnt_global_chunk_size=8), "multiple of every tnt_local_chunk_sizes"),
    (dict(tnt_local_chunk_sizes=[]), "at least one local memory"),
    (dict(tnt_local_chunk_sizes="4,x"), "list of integers"),
    (dict(inner_optimizer="muon"), "unknown inner_optimizer"),
])
def test_bad_tnt_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(memory_layer="tnt", **kwargs)


def test_local_chunk_sizes_from_a_string():
    assert MemoryLMConfig(memory_layer="tnt", tnt_local_chunk_sizes="8, 16", tnt_global_chunk_size=32).tnt_local_chunk_sizes == [8, 16]
    assert isinstance(build_mixer(MemoryLMConfig(memory_layer="tnt", hidden_size=32, num_attention_heads=4,
                                                 num_hidden_layers=1), 0), TNTLayer)


def test_two_stage_cli_option(tmp_path):
    """pretrain.train --model FOLDER --tnt-local-chunk-sizes 2: the stage-2 model config; bad values fail early."""
    from pretrain.config import ConfigError, parse_config
    from pretrain.train import build_model, build_model_config

    cfg = preset_config("test", memory_layer="tnt", tnt_global_chunk_size=16, tnt_local_chunk_sizes=[8],
                        tnt_reset_period=16)
    MemoryLMForCausalLM(cfg).save_pretrained(tmp_path / "stage1")
    train_cfg = parse_config(["--model", str(tmp_path / "stage1"), "--tnt-local-chunk-sizes", "2"])
    mcfg = build_model_config(train_cfg)
    assert mcfg.tnt_local_chunk_sizes == [2]
    model = build_model(train_cfg, mcfg)
    assert model.model.layers[1].mixer.local_chunk_sizes == [2]
    for value, match in [("2,4", "1 local memories"), ("3", "multiple of every"), ("x", "comma-separated integers")]:
        with pytest.raises(ConfigError, match=match):
            build_model_config(parse_config(["--model", str(tmp_path / "stage1"), "--tnt-local-chunk-sizes", value]))
    with pytest.raises(ConfigError, match="applies to TNT models"):
        build_model_config(parse_config(["--model", "test", "--tnt-local-chunk-sizes", "4"]))


def test_initial_fast_weights_get_no_weight_decay():
    from pretrain.optim import decay_parameter_names

    for layer in ("tnt", "hope"):
        model = MemoryLMForCausalLM(preset_config("test", memory_layer=layer, num_hidden_layers=1))
        decayed, _ = decay_parameter_names(model)
        mixer = model.model.layers[0].mixer
        fast = [f"model.layers.0.mixer.{n}" for n in mixer.fast_weight_names]
        assert fast and not set(fast) & set(decayed), layer
        assert "model.layers.0.mixer.q_proj.weight" in decayed


def test_qk_projection_in_chunks(monkeypatch):
    """The chunked linear attention of the Q-K projection (chunks of 3 here) = the token loop."""
    import models.ops.tnt.chunk as tnt

    monkeypatch.setattr(tnt, "QK_CHUNK", 3)
    layer = mixer(tnt_global_chunk_size=16, tnt_local_chunk_sizes=[2], tnt_reset_period=16)
    x = torch.randn(2, 37, 32, dtype=F64)
    y, s = run_pieces(layer, x, [5, 30])
    layer.scan_impl = "reference"
    y_ref, s_ref = run_pieces(layer, x, [5, 30])
    assert (y - y_ref).abs().max() <= 1e-10 and max_state_diff(s, s_ref) <= 1e-10
