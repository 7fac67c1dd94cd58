"""The inner loop's knobs (inner_steps, inner_grad_clip, inner_init_pull, inner_lr_schedule, inner_loss):
chunked forms = the generic token-by-token reference (float64, ≤ 1e-5, in pieces and in one call),
the reference = the equations written out by hand, causality of next_token, config-time errors."""
import pytest
import torch

from models import MemoryLMConfig, MemoryLMForCausalLM, preset_config
from models.hf.configuration_memory import INNER_KNOB_LAYERS, MEMORY_LAYERS
from models.layers.deltanet import DeltaNetLayer
from models.ops.delta_rule.naive import delta_rule_recipe
from models.layers.lact import LaCTLayer
from models.hf.modeling_memory import build_mixer
from models.common.parts import InnerKnobs, clip_grad_per_layer
from models.common.reference import memory_scan_reference
from models.layers.titans import TitansMemory
from models.layers.ttt import TTTLayer
from tests.models.helpers import check_one_call_equals_pieces, max_state_diff, perturb, run_pieces

F64 = torch.float64
KNOBS = {
    "schedule": InnerKnobs(lr_decay=0.1),
    "clip": InnerKnobs(grad_clip=0.05),
    "pull": InnerKnobs(init_pull=0.5),
    "mse": InnerKnobs(loss="mse"),
    "next_token": InnerKnobs(loss="next_token"),
    "steps": InnerKnobs(steps=3),
    "all": InnerKnobs(grad_clip=0.05, init_pull=0.3, lr_decay=0.05, loss="next_token"),
    "all_steps": InnerKnobs(steps=2, init_pull=0.3, lr_decay=0.05, loss="next_token"),
    "ttt_steps": InnerKnobs(steps=3, grad_clip=0.05, lr_decay=0.05),
    "ttt_all_steps": InnerKnobs(steps=2, grad_clip=0.1, lr_decay=0.05, loss="next_token"),
    "ttt_mse_steps": InnerKnobs(steps=2, loss="mse"),
    "all_no_pull": InnerKnobs(grad_clip=0.01, lr_decay=0.05, loss="next_token"),
    "titans_steps": InnerKnobs(steps=2),
    "titans_all_steps": InnerKnobs(steps=3, grad_clip=0.05, lr_decay=0.1, loss="next_token"),
}
# layer → the knobs its chunk form implements ("mse" is the delta rule's and Titans' own loss)
LAYERS = {
    "ttt_linear": ["schedule", "clip", "pull", "mse", "next_token", "all", "ttt_steps", "ttt_all_steps", "ttt_mse_steps"],
    "ttt_mlp": ["schedule", "clip", "pull", "mse", "next_token", "all", "ttt_steps", "ttt_all_steps", "ttt_mse_steps"],
    "deltanet": ["schedule", "pull", "next_token", "steps", "all_steps"],
    "gated_deltanet": ["schedule", "pull", "next_token", "steps", "all_steps"],
    "titans_depth1": ["schedule", "clip", "pull", "next_token", "all", "titans_steps", "titans_all_steps"],
    "titans": ["schedule", "clip", "pull", "next_token", "all", "titans_steps", "titans_all_steps"],
    "titans_sgd": ["schedule", "clip", "pull", "next_token", "all", "titans_steps", "titans_all_steps"],
    "lact": ["schedule", "clip", "mse", "next_token", "all_no_pull"],
    "lact_sgd": ["schedule", "clip", "pull", "mse", "next_token", "all"],
}


def make(layer, knobs):
    torch.manual_seed(0)
    if layer.startswith("ttt"):
        m = TTTLayer(32, 4, inner=layer[4:], mini_batch_size=8, knobs=knobs)
    elif layer.startswith("lact"):
        m = LaCTLayer(32, 4, num_lact_heads=2, chunk_size=6, window=5, base_lr=0.1,
                      optimizer="sgd" if layer == "lact_sgd" else "muon", knobs=knobs)
    elif layer.endswith("deltanet"):
        m = DeltaNetLayer(32, 4, gated=layer == "gated_deltanet", chunk_size=8, conv_kernel=3, knobs=knobs)
    else:
        m = TitansMemory(32, 4, chunk_size=4, depth=1 if layer == "titans_depth1" else 2,
                         optimizer="sgd" if layer == "titans_sgd" else "momentum", conv_kernel=3, knobs=knobs)
    return perturb(m.to(F64))


def set_impl(layer, impl):
    layer.scan_impl = impl


CASES = [(layer, knob) for layer, knobs in LAYERS.items() for knob in knobs]


@pytest.mark.parametrize("layer,knob", CASES)
def test_chunked_equals_reference_in_pieces(layer, knob):
    m = make(layer, KNOBS[knob])
    x = torch.randn(2, 29, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    cuts = [5, 6, 21]  # mid-chunk starts and ends
    y, s = run_pieces(m, x, cuts)
    set_impl(m, "reference")
    y_ref, s_ref = run_pieces(m, x, cuts)
    assert (y - y_ref).abs().max() <= 1e-5
    assert max_state_diff(s, s_ref) <= 1e-5
    m.knobs = None  # the knob is not a no-op
    set_impl(m, "chunk")
    if knob not in ("steps", "all_steps"):  # (K-wide projections need the knob)
        assert (m(x)[0] - y).abs().max() > 1e-4


@pytest.mark.parametrize("layer,knob", [("ttt_linear", "all"), ("ttt_linear", "ttt_all_steps"), ("ttt_mlp", "all"),
                                        ("ttt_mlp", "ttt_all_steps"),
                                        ("gated_deltanet", "all_steps"), ("titans", "all"), ("titans", "titans_all_steps"),
                                        ("lact", "all_no_pull"),
                                        ("lact_sgd", "all")])
def test_one_call_equals_pieces_with_gradients(layer, knob):
    check_one_call_equals_pieces(make(layer, KNOBS[knob]), torch.randn(2, 27, 32, dtype=F64), [4, 13, 14])


@pytest.mark.parametrize("layer", ["ttt_linear", "gated_deltanet", "titans"])
def test_next_token_is_causal(layer):
    """Changing tokens after t changes no output up to t (the pair (k_t, v_{t+1}) trains from t + 1 on)."""
    m = make(layer, KNOBS["next_token"])
    x = torch.randn(1, 20, 32, dtype=F64)
    x2 = x.clone()
    x2[:, 11:] += torch.randn(1, 9, 32, dtype=F64)
    y, y2 = m(x)[0], m(x2)[0]
    assert (y[:, :11] - y2[:, :11]).abs().max() <= 1e-12
    assert (y[:, 11:] - y2[:, 11:]).abs().max() > 1e-3


def test_default_knobs_keep_the_plain_code_path():
    for m in (TTTLayer(32, 4, knobs=InnerKnobs(loss="ln_recon")), DeltaNetLayer(32, 4, knobs=InnerKnobs(loss="mse")),
              TitansMemory(32, 4, knobs=InnerKnobs())):
        assert m.knobs is None


# ------------------------------------------------------------------ the reference = the equations


def _delta_inputs(T=7, K=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, T, d, generator=g, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(1, 1, T, K, d, generator=g, dtype=F64), dim=-1)
    v = torch.randn(1, 1, T, K, d, generator=g, dtype=F64)
    beta = torch.rand(1, 1, T, K, generator=g, dtype=F64)
    alpha = torch.rand(1, 1, T, generator=g, dtype=F64) * 0.5 + 0.5
    S = torch.randn(1, 1, d, d, generator=g, dtype=F64)
    return q, k, v, beta, alpha, S


def test_reference_delta_product_pull_schedule_by_hand():
    """h ← α_t h; for j = 1..K: h ← h − β'_{t,j}(k(kᵀ... ) + λh) (fla's gated_delta_product naive loop + pull),
    β' = β/(1 + t·decay)."""
    q, k, v, beta, alpha, S = _delta_inputs()
    lam, decay = 0.3, 0.2
    knobs = InnerKnobs(steps=2, init_pull=lam, lr_decay=decay)
    o, w, _, _, _ = memory_scan_reference(delta_rule_recipe(), {"S": S}, None, {}, q, k, v,
                                          {"alpha": alpha, "beta": beta}, {}, 0, knobs, {"S": torch.zeros_like(S)})
    h, outs = S[0, 0].clone(), []
    for t in range(q.shape[2]):
        h = alpha[0, 0, t] * h
        for j in range(2):
            kk, vv, bb = k[0, 0, t, j][:, None], v[0, 0, t, j][None, :], beta[0, 0, t, j] / (1 + t * decay)
            h = h - bb * (kk @ (kk.T @ h - vv) + lam * h)
        outs.append(q[0, 0, t] @ h)
    assert (o[0, 0] - torch.stack(outs)).abs().max() <= 1e-12
    assert (w["S"][0, 0] - h).abs().max() <= 1e-12


@pytest.mark.parametrize("b", [1, 4])
def test_reference_ttt_steps_by_hand(b):
    """TTT-Linear (mse) with K = 3: θ_t^(s) = θ₀ − s_i Σ_{j≤t} η_j Σ_{k≤s} ∇ℓ_j(θ_j^(k−1)) within each
    mini-batch (θ_j^(0) = θ₀), o_t = q_t + q̃_t θ_t^(K); for b = 1 these are K plain GD steps."""
    from models.ops.ttt.naive import ttt_scan_reference

    g = torch.Generator().manual_seed(2)
    T, d, K = 9, 3, 3
    q, k, v = (torch.randn(1, 1, T, d, generator=g, dtype=F64) for _ in range(3))
    lr = torch.rand(1, 1, T, generator=g, dtype=F64) * 0.3
    offset = torch.zeros(b, dtype=F64)
    W = {"W1": 0.3 * torch.randn(1, 1, d, d, generator=g, dtype=F64), "b1": torch.zeros(1, 1, 1, d, dtype=F64)}
    out, w, pend, _ = ttt_scan_reference("linear", W, None, q, k, v, lr, offset, torch.ones(1, d, dtype=F64),
                                         torch.zeros(1, d, dtype=F64), 0, b, knobs=InnerKnobs(steps=K, loss="mse"))

    def grad(theta, j):  # ∇ of ½‖x̃θ − (v − k)‖² at θ (folded), token j
        x = torch.cat([k[0, 0, j], torch.ones(1, dtype=F64)])[None]
        return x.T @ (x @ theta - (v[0, 0, j] - k[0, 0, j])[None])

    theta0 = torch.cat([W["W1"][0, 0], W["b1"][0, 0]])
    iters, outs = {}, []  # iters[(j, s)] = θ_j^(s)
    for t in range(T):
        i = t % b
        if i == 0 and t:
            theta0 = iters[(t - 1, K)]
        start = t - i
        iters[(t, 0)] = theta0
        for s in range(1, K + 1):
            total = sum(lr[0, 0, j] * grad(iters[(j, kk - 1)] if kk > 1 else theta0, j)
                        for j in range(start, t + 1) for kk in range(1, s + 1))
            iters[(t, s)] = theta0 - total / (i + 1)
        qa = torch.cat([q[0, 0, t], torch.ones(1, dtype=F64)])
        outs.append(q[0, 0, t] + qa @ iters[(t, K)])
    assert (out[0, 0] - torch.stack(outs)).abs().max() <= 1e-12
    if b == 1:  # K plain GD steps per token
        theta = torch.cat([W["W1"][0, 0], W["b1"][0, 0]])
        for t in range(T):
            for _ in range(K):
                theta = theta - lr[0, 0, t] * grad(theta, t)
        assert (torch.cat([w["W1"][0, 0], w["b1"][0, 0]]) - theta).abs().max() <= 1e-12


def test_reference_next_token_is_the_shifted_pair():
    """next_token = the plain rule on (k_{t−1}, v_t), with no step at the document's first token."""
    q, k, v, beta, alpha, S = _delta_inputs(K=1)
    k, v, beta = k[:, :, :, 0], v[:, :, :, 0], beta[..., 0]
    gates = {"alpha": alpha, "beta": beta}
    o, w, _, _, last = memory_scan_reference(delta_rule_recipe(), {"S": S}, None, {}, q, k, v, gates, {}, 0,
                                             InnerKnobs(loss="next_token"))
    k_shift = torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], 2)
    beta_shift = torch.cat([torch.zeros_like(beta[:, :, :1]), beta[:, :, 1:]], 2)
    o2, w2, _, _ = memory_scan_reference(delta_rule_recipe(), {"S": S}, None, {}, q, k_shift, v,
                                         {"alpha": alpha, "beta": beta_shift}, {}, 0)
    assert (o - o2).abs().max() <= 1e-12 and (w["S"] - w2["S"]).abs().max() <= 1e-12
    assert torch.equal(last, k[:, :, -1])


def test_clip_per_layer():
    g = torch.Generator().manual_seed(0)
    grad = {"W1": torch.randn(2, 3, 4, 5, generator=g), "b1": torch.randn(2, 3, 1, 5, generator=g),
            "W2": 1e-3 * torch.randn(2, 3, 5, 4, generator=g)}
    out = clip_grad_per_layer(grad, 0.5)
    n1 = torch.sqrt(out["W1"].pow(2).sum((-2, -1)) + out["b1"].pow(2).sum((-2, -1)))
    assert torch.allclose(n1, torch.full_like(n1, 0.5))  # clipped: W1 and b1 scaled together
    assert torch.equal(out["W2"], grad["W2"])  # below τ: unchanged
    assert torch.allclose(out["b1"] / grad["b1"], (out["W1"] / grad["W1"])[..., :1, :1].expand_as(grad["b1"]))


# ------------------------------------------------------------------ models and configuration


@pytest.mark.parametrize("layer,knobs", [("ttt_mlp", dict(inner_grad_clip=0.5, inner_loss="next_token")),
                                         ("gated_deltanet", dict(inner_steps=2, inner_lr_schedule="inverse:0.01")),
                                         ("titans_mag", dict(inner_init_pull=0.1, inner_loss="next_token")),
                                         ("titans_mac", dict(inner_steps=2, inner_grad_clip=0.5)),
                                         ("lact", dict(inner_grad_clip=0.5, inner_loss="next_token"))])
def test_model_with_knobs_pieces_equal_one_call(layer, knobs):
    torch.manual_seed(0)
    cfg = preset_config("test", memory_layer=layer, mini_batch_size=4, deltanet_chunk_size=4, titans_chunk_size=4,
                        attention_window=5, num_persistent_tokens=2, lact_chunk_size=6, lact_num_heads=2, **knobs)
    model = MemoryLMForCausalLM(cfg).to(F64).eval()
    ids = torch.randint(0, 128, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        a = model(ids[:, :6])
        b = model(ids[:, 6:], memory_state=a.memory_state)
    assert (torch.cat([a.logits, b.logits], 1) - full).abs().max() <= 1e-8


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_layer="ttt_mlp", inner_steps=2, inner_init_pull=0.1), "inner_steps > 1 with inner_init_pull"),
    (dict(memory_layer="lact", inner_steps=2), r"inner_steps is not supported by \['lact'\]"),
    (dict(memory_layer="titans_mac", inner_steps=2, inner_init_pull=0.1), "inner_steps > 1 with inner_init_pull"),
    (dict(memory_layer="deltanet", inner_grad_clip=1.0), r"inner_grad_clip is not supported by \['deltanet'\]"),
    (dict(memory_layer="titans", inner_loss="ln_recon"), "inner_loss=ln_recon is not supported"),
    (dict(memory_layer="lact", inner_loss="ln_recon"), r"inner_loss=ln_recon is not supported by \['lact'\]"),
    (dict(memory_layer="ttt_linear", layer_pattern="M,atlas", num_hidden_layers=2, inner_init_pull=0.1),
     r"inner_init_pull is not supported by \['atlas'\]"),
    (dict(memory_layer="gated_deltanet", inner_init_pull=1.0), "must be < 1"),
    (dict(memory_layer="ttt_linear", inner_lr_schedule="cosine"), "unknown inner_lr_schedule"),
    (dict(memory_layer="ttt_linear", inner_lr_schedule="inverse:-1"), "unknown inner_lr_schedule"),
    (dict(memory_layer="ttt_linear", inner_loss="huber"), "unknown inner_loss"),
    (dict(memory_layer="ttt_linear", inner_grad_clip=0.0), "inner_grad_clip must be > 0"),
    (dict(memory_layer="ttt_linear", inner_steps=0), "inner_steps must be ≥ 1"),
])
def test_bad_knob_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryLMConfig(**kwargs)


def test_knob_table_names_registered_layers_and_attention_is_ignored():
    assert all(set(layers) <= set(MEMORY_LAYERS) for layers in INNER_KNOB_LAYERS.values())
    cfg = MemoryLMConfig(memory_layer="ttt_linear", layer_pattern="M,S", num_hidden_layers=2, inner_grad_clip=1.0)
    assert cfg.inner_grad_clip == 1.0 and MemoryLMConfig(inner_lr_schedule="inverse:0.5").inner_lr_decay == 0.5
    assert build_mixer(cfg, 0).knobs == InnerKnobs(grad_clip=1.0)


@pytest.mark.parametrize("layer,knobs", [("ttt_linear", dict(inner_lr_schedule="inverse:0.2", inner_loss="next_token",
                                                             inner_init_pull=0.2)),
                                         ("gated_deltanet", dict(inner_steps=2, inner_lr_schedule="inverse:0.2",
                                                                 inner_loss="next_token")),
                                         ("titans", dict(inner_grad_clip=0.1, inner_lr_schedule="inverse:0.2",
                                                         inner_loss="next_token"))])
def test_packed_documents_restart_schedule_and_next_token(layer, knobs):
    """With document resets (models/common/varlen.py) t of the schedule restarts at 0 and a document's first
    token has no next_token pair: a packed row = each document alone."""
    torch.manual_seed(0)
    cfg = preset_config("test", memory_layer=layer, mini_batch_size=4, deltanet_chunk_size=4, titans_chunk_size=4,
                        **knobs)
    model = perturb(MemoryLMForCausalLM(cfg), 0.05).double().eval()
    ids = torch.randint(0, 128, (1, 17))
    doc_ids = torch.tensor([[0] * 6 + [1] * 11])
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids).logits
        alone = torch.cat([model(ids[:, :6]).logits, model(ids[:, 6:]).logits], 1)
        carried = model(ids).logits  # no reset: differs after the boundary
    assert (packed - alone).abs().max() <= 1e-6
    assert (packed[:, 6:] - carried[:, 6:]).abs().max() > 1e-4


def test_ttt_prepare_scan_output_keeps_the_knobs():
    """TTT's context-parallel steps apply the scan-level knobs (next_token is refused there)."""
    m = make("ttt_mlp", InnerKnobs(grad_clip=0.05, init_pull=0.3, lr_decay=0.05, loss="mse"))
    x = torch.randn(2, 13, 32, dtype=F64)
    y, s = m(x)
    state = m.init_state(2)
    q, k, v, lr, _ = m.prepare(x, state)
    out, _, _ = m.scan_from(state.weights, None, q, k, v, lr, 0)
    assert (m.output(x, out) - y).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="next_token"):
        make("ttt_linear", KNOBS["next_token"]).scan_from(state.weights, None, q, k, v, lr, 0)
    # K steps: a piece starting mid-mini-batch needs every step's pending sum (CP passes only the plain ones)
    m = make("ttt_mlp", KNOBS["ttt_steps"])
    _, s = m(x[:, :5])
    plain = {n: t for n, t in s.pending.items() if "@" not in n}
    q, k, v, lr, _ = m.prepare(x[:, 5:], s)
    with pytest.raises(ValueError, match="one pending sum per step"):
        m.scan_from(s.weights, plain, q, k, v, lr, 5)
    out, _, _ = m.scan_from(s.weights, s.pending, q, k, v, lr, 5)
    assert (m.output(x[:, 5:], out) - m(x[:, 5:], s)[0]).abs().max() <= 1e-12


def test_knobs_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    cfg = preset_config("test", memory_layer="ttt_mlp", mini_batch_size=4, inner_steps=2, inner_grad_clip=0.5,
                        inner_lr_schedule="inverse:0.1", inner_loss="next_token")
    model = MemoryLMForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = MemoryLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.inner_lr_decay == 0.1 and loaded.config.inner_steps == 2
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


# ------------------------------------------------------------------ context parallelism (CP = 2)

CP_VARIANTS = {  # (config, float dtype): TTT through its prepare/scan/output CP path, the others by state pass
    # (24 tokens, 12 per rank: mini-batch / chunk 8 puts the rank boundary inside one, so the pending sums
    # and Titans' other chains cross it)
    "ttt_mlp_clip_pull": (dict(memory_layer="ttt_mlp", mini_batch_size=8, inner_grad_clip=0.5, inner_init_pull=0.2,
                               inner_lr_schedule="inverse:0.05"), torch.float32),
    "ttt_linear_steps": (dict(memory_layer="ttt_linear", inner_steps=2, inner_grad_clip=0.5), torch.float32),
    "titans_next_token": (dict(memory_layer="titans", titans_chunk_size=4, inner_grad_clip=0.5, inner_init_pull=0.2,
                               inner_loss="next_token"), torch.float32),
    "titans_mag_steps": (dict(memory_layer="titans_mag", titans_chunk_size=8, attention_window=5, inner_steps=2,
                              inner_loss="next_token"), torch.float32),
    "lact_next_token": (dict(memory_layer="lact", lact_chunk_size=6, lact_num_heads=2, inner_optimizer="sgd",
                             attention_window=5, inner_grad_clip=0.5, inner_loss="next_token"), torch.float64),
    "gdn_steps_next_token": (dict(memory_layer="gated_deltanet", deltanet_chunk_size=4, inner_steps=2,
                                  inner_loss="next_token", inner_lr_schedule="inverse:0.05"), torch.float32),
}


def cp_worker(names):
    """CP = 2 (sequence split over 2 ranks) vs one process: max |Δ| of logits, loss and every grad."""
    import copy

    from parallel import init_parallel
    from parallel.loss import cp_slice
    from tests.parallel.workers import batch, parallel_run, reference_run

    dims, out = init_parallel(tp=1, cp=2), {}
    for name in names:
        cfg, dtype = CP_VARIANTS[name]
        torch.manual_seed(0)
        model = perturb(MemoryLMForCausalLM(preset_config("test", **{"mini_batch_size": 4, "conv_kernel": 3, **cfg})), 0.05)
        model = model.to(dtype)
        ids, tgt = batch(model.config, 24)
        logits, loss, grads, n = reference_run(copy.deepcopy(model), ids, tgt)
        try:
            _, plogits, ploss, _, pgrads = parallel_run(model, dims, "pass", ids, tgt, n)
        except ValueError as exc:
            out[name] = str(exc)
            continue
        out[name] = dict(logits=(plogits - cp_slice(logits, dims)).abs().max().item(),
                         loss=abs(ploss.item() - loss.item()) / n.item(),
                         grad=max((pgrads[k] - grads[k]).abs().max().item() for k in grads))
    return out


@pytest.mark.slow
def test_knobs_under_context_parallelism():
    from parallel.launch import run_distributed

    results = run_distributed(cp_worker, 2, args=(list(CP_VARIANTS),), timeout=300)
    for res in results:  # rank 0, rank 1 (whose piece starts from the state rank 0 sent)
        for name in CP_VARIANTS:
            r = res[name]
            assert isinstance(r, dict) and r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["grad"] <= 1e-5, (name, r)


def test_parallel_modes_refuse_knobs_they_cannot_run():
    from parallel import ParallelDims, parallelize

    def model(**kw):
        return MemoryLMForCausalLM(preset_config("test", memory_layer="gated_deltanet", **kw))

    with pytest.raises(ValueError, match="cp_mode='prefix' does not take the inner-loop knobs"):
        parallelize(model(inner_lr_schedule="inverse:0.1"), ParallelDims(cp=2), cp_mode="prefix")
    with pytest.raises(ValueError, match="not supported under tensor parallelism"):
        parallelize(model(inner_steps=2), ParallelDims(tp=2))


@pytest.mark.parametrize("layer,knob", [("ttt_mlp", "all"), ("ttt_mlp", "ttt_all_steps"), ("gated_deltanet", "all_steps"),
                                        ("titans", "all"), ("titans", "titans_all_steps"), ("lact_sgd", "all")])
def test_chunked_gradients_equal_reference(layer, knob):
    """Backward of the chunked forms = backward through the token-by-token reference (inputs, parameters)."""
    m = make(layer, KNOBS[knob])
    x = torch.randn(1, 13, 32, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(1, 13, 32, dtype=F64, generator=torch.Generator().manual_seed(4))
    grads = []
    for impl in ("chunk", "reference"):
        set_impl(m, impl)
        y, _ = run_pieces(m, x, [5])
        grads.append(torch.autograd.grad((y * w).sum(), [x, *m.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_ttt_steps_online_chunked_equals_reference(inner):
    """mini_batch_size 1 (the online rule): K steps are K plain GD steps per token, in both forms."""
    torch.manual_seed(0)
    m = perturb(TTTLayer(32, 4, inner=inner, mini_batch_size=1, knobs=InnerKnobs(steps=3, grad_clip=0.5)).to(F64))
    x = torch.randn(2, 9, 32, dtype=F64)
    y, s = run_pieces(m, x, [4])
    set_impl(m, "reference")
    y_ref, s_ref = run_pieces(m, x, [4])
    assert (y - y_ref).abs().max() <= 1e-5 and max_state_diff(s, s_ref) <= 1e-5
