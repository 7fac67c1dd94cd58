"""Functions that run inside the spawned ranks (module level, so spawn can import them)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.layers.registry import LAYERS

VARIANTS = {
    "linear": dict(memory_layer="ttt_linear"),
    "mlp": dict(memory_layer="ttt_mlp"),
    "linear+conv+shareqk+gate": dict(memory_layer="ttt_linear", pre_conv=True, share_qk=True, use_gate=True),
    "mlp+conv+shareqk+gate": dict(memory_layer="ttt_mlp", pre_conv=True, share_qk=True, use_gate=True),
}
TTT_VARIANTS = tuple(VARIANTS)  # the TTT layers: scan-level CP wavefront and Ulysses
# every other mixer (TP by heads; CP: the scan-level state pass, prefix combine for the DeltaNet family,
# all-gather / halo attention). SWA window 16: a halo from one rank at cp=2 (pieces of 20), the
# windowed all-gather at cp=4 (pieces of 10 < 15).
GENERIC_VARIANTS = {
    "gated_deltanet+swa": dict(memory_layer="gated_deltanet", layer_pattern="M,S", attention_window=16,
                               deltanet_chunk_size=8, pre_conv=True),
    "deltanet+attention": dict(memory_layer="deltanet", layer_pattern="M,A", deltanet_chunk_size=8),
    "titans_mac": dict(memory_layer="titans_mac", titans_chunk_size=4, titans_segment_size=8),
    "titans_mag": dict(memory_layer="titans_mag", titans_chunk_size=8, attention_window=8),
    "titans_mal": dict(memory_layer="titans_mal", titans_chunk_size=8, attention_window=8),
    "titans+swa": dict(memory_layer="titans", layer_pattern="M,S", titans_chunk_size=8, attention_window=4),
    "lact": dict(memory_layer="lact", lact_chunk_size=16, attention_window=8),
}
PREFIX_VARIANTS = ("gated_deltanet+swa", "deltanet+attention")
VARIANTS.update(GENERIC_VARIANTS)
# memory-layer family II, run in their own job (tests/parallel/test_family2_parallel.py): TNT with a
# global chunk and reset period of 8 and local chunk 4 (CP pieces of 20/10 cut inside both), Hope
FAMILY2_VARIANTS = {
    "tnt": dict(memory_layer="tnt", tnt_global_chunk_size=8, tnt_local_chunk_sizes=[4], tnt_reset_period=8),
    "hope": dict(memory_layer="hope", hope_chunk_size=4, hope_cms_chunk_sizes=[8]),
}
FAMILY2_VARIANTS.update({  # Miras (one per state kind) and ATLAS: chunk 8, so CP pieces of 20/10 end mid-chunk
    "moneta": dict(memory_layer="moneta", miras_chunk_size=8),
    "memora": dict(memory_layer="memora", miras_chunk_size=8),
    "atlas": dict(memory_layer="atlas", atlas_chunk_size=8, atlas_window=3),
})
VARIANTS.update(FAMILY2_VARIANTS)
# every registered layer type under its own name, at its registered test sizes (tests/parallel/test_registry_parallel.py)
REGISTRY_VARIANTS = {}
for _name, _spec in LAYERS.items():
    REGISTRY_VARIANTS[_name] = dict(memory_layer=_name, **_spec.test_config) if _spec.kind == "memory" else \
        dict(layer_pattern=[_name], **_spec.test_config)
    VARIANTS.setdefault(_name, REGISTRY_VARIANTS[_name])
# LaCT's Newton–Schulz/Muon step amplifies float32 rounding: the CP=4 gradients differ by 1.7e-5
# in float32 but by 5e-15 in float64, so its exactness is checked in float64.
DTYPES = {"lact": torch.float64}
# Memora's positive (softmax) weights make the LayerNorm inside its memory ill-conditioned and ATLAS
# has Newton–Schulz per token: float32 TP/CP differences reach 2e-5 / 8e-6, so both are checked in float64
DTYPES.update(memora=torch.float64, atlas=torch.float64)


def supported(tp: int, cp: int, variant: str, mode: str) -> bool:
    """Which (layout, variant, mode) combinations the suite runs (4 heads in every variant)."""
    if mode == "ulysses":
        return variant in TTT_VARIANTS and (4 // tp) % cp == 0
    if mode == "prefix":
        return variant in PREFIX_VARIANTS
    return True


def build_reference(variant: str, seed: int = 0, dtype=torch.float32, **overrides):
    from models import MemoryLMForCausalLM, preset_config

    cfg = preset_config("test", **{"mini_batch_size": 8, "conv_kernel": 3, **VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    model = MemoryLMForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # off the init, so no term is trivially zero (token_idx_offset, biases, ...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(cfg, seq: int, seed: int = 1, B: int = 2):
    from parallel.loss import causal_targets

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, seq), generator=gen)
    tgt = causal_targets(ids)
    tgt[0, 3] = -100  # a few ignored targets besides the last one
    tgt[1, seq // 2] = -100
    return ids, tgt


def reference_run(model, ids, tgt):
    logits = model(ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
    n = (tgt != -100).sum()
    (loss / n).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads, n


def parallel_run(ref_model, dims, mode, ids, tgt, n_total):
    from parallel import gather_full_grads, parallel_cross_entropy, parallelize
    from parallel.loss import cp_slice

    model = parallelize(copy.deepcopy(ref_model), dims, cp_mode=mode)
    model.zero_grad(set_to_none=True)
    logits = model(cp_slice(ids, dims)).logits
    loss_sum, count = parallel_cross_entropy(logits, cp_slice(tgt, dims), dims)
    (loss_sum / n_total).backward()
    if dims.tp > 1:  # vocab-sharded → full
        parts = [torch.empty_like(logits) for _ in range(dims.tp)]
        dist.all_gather(parts, logits.detach().contiguous(), group=dims.tp_group)
        logits = torch.cat(parts, -1)
    loss_sum = loss_sum.detach().clone()
    if dims.cp > 1:
        dist.all_reduce(loss_sum, group=dims.cp_group)
        dist.all_reduce(count, group=dims.cp_group)
    return model, logits.detach(), loss_sum, count, gather_full_grads(model, dims)


def equivalence_worker(layouts, cases):
    """For each (tp, cp) layout and (variant, mode, seq) case: max |Δ| of logits, loss, every grad."""
    from parallel import init_parallel
    from parallel.loss import cp_slice

    out = {}
    refs = {}
    for variant, seq in {(v, s) for v, _, s in cases}:
        model = build_reference(variant, dtype=DTYPES.get(variant, torch.float32))
        ids, tgt = batch(model.config, seq)
        logits, loss, grads, n = reference_run(copy.deepcopy(model), ids, tgt)
        refs[variant, seq] = (model, ids, tgt, logits, loss, grads, n)
    for tp, cp in layouts:
        dims = init_parallel(tp=tp, cp=cp)
        for variant, mode, seq in cases:
            if not supported(tp, cp, variant, mode):
                continue
            model, ids, tgt, ref_logits, ref_loss, ref_grads, n = refs[variant, seq]
            par, logits, loss, count, grads = parallel_run(model, dims, mode, ids, tgt, n)
            assert count.item() == n.item()
            assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
            gdiff = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in grads}
            worst = max(gdiff, key=gdiff.get)
            out[(tp, cp, variant, mode, seq)] = dict(
                logits=(logits - cp_slice(ref_logits, dims)).abs().max().item(),
                loss=abs(loss.item() - ref_loss.item()) / n.item(),  # mean loss
                grad=gdiff[worst],
                worst=worst,
                grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
                zero_grads=[k for k, g in ref_grads.items() if g.abs().max() == 0],
                dtype=str(ref_logits.dtype),
            )
            dist.barrier()
    return out


# strided shards (Titans' [θ|η|α] gates, LaCT's [q|k|v]) and every other TP plan
STATE_DICT_VARIANTS = ("mlp+conv+shareqk+gate", "titans_mac", "titans_mag", "lact", "gated_deltanet+swa")


def state_dict_worker(tp: int, cp: int):
    from parallel import init_parallel

    dims = init_parallel(tp=tp, cp=cp)
    return {v: _state_dict_check(v, dims) for v in STATE_DICT_VARIANTS}


def _state_dict_check(variant, dims):
    """gather_full_state_dict == the single-device state_dict; load_full_state_dict round-trips."""
    from parallel import gather_full_state_dict, load_full_state_dict, parallelize

    ref = build_reference(variant)
    full = ref.state_dict()
    par = parallelize(copy.deepcopy(ref), dims)
    got = gather_full_state_dict(par, dims)
    assert got.keys() == full.keys(), sorted(set(got) ^ set(full))
    diffs = {k: (got[k] - full[k]).abs().max().item() for k in full if got[k].shape == full[k].shape}
    shapes_ok = all(got[k].shape == full[k].shape for k in full)
    # load a different full state into the sharded model and gather it back
    other = build_reference(variant, seed=5).state_dict()
    load_full_state_dict(par, other, dims)
    back = gather_full_state_dict(par, dims)
    round_trip = max((back[k] - other[k]).abs().max().item() for k in other)
    return dict(shapes_ok=shapes_ok, max_diff=max(diffs.values()), round_trip=round_trip)


def errors_worker():
    """Errors that need a real process group."""
    from parallel import init_parallel

    msgs = {}
    try:
        init_parallel(tp=3, cp=1)
    except ValueError as e:
        msgs["world"] = str(e)
    return msgs


def delta_rule(q, k, v, beta, S):
    """Reference DeltaNet: S_t = S_{t-1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t (token loop).
    q, k: [B, T, dk]; v: [B, T, dv]; beta: [B, T]; S: [B, dv, dk]."""
    outs = []
    for t in range(q.shape[1]):
        kt, b = k[:, t, None, :], beta[:, t, None, None]
        S = S - b * (S @ kt.transpose(1, 2)) @ kt + b * v[:, t, :, None] @ kt
        outs.append((S @ q[:, t, :, None]).squeeze(-1))
    return torch.stack(outs, 1), S


def delta_rule_summary(k, beta, v):
    """(A, B) of a piece: S_out = S_in · A + B."""
    Bsz, _, dk = k.shape
    A = torch.eye(dk, dtype=k.dtype).expand(Bsz, dk, dk)
    for t in range(k.shape[1]):
        kt, b = k[:, t, None, :], beta[:, t, None, None]
        A = A - b * (A @ kt.transpose(1, 2)) @ kt
    _, B = delta_rule(torch.zeros_like(k), k, v, beta, v.new_zeros(Bsz, v.shape[-1], dk))
    return A, B


def prefix_worker(cp: int):
    """DeltaNet under all-gather + prefix combine = the single-process recurrence (outputs, grads)."""
    from parallel import cp_slice, init_parallel
    from parallel.prefix import prefix_state

    dims = init_parallel(tp=1, cp=cp)
    gen = torch.Generator().manual_seed(3)
    B, T, dk, dv = 2, 24, 8, 6
    f64 = dict(generator=gen, dtype=torch.float64)  # float64: the check is of the algebra, not rounding
    q, v = torch.randn(B, T, dk, **f64), torch.randn(B, T, dv, **f64)
    k = F.normalize(torch.randn(B, T, dk, **f64), dim=-1)
    beta = torch.rand(B, T, **f64)
    S0, w = torch.randn(B, dv, dk, **f64), torch.randn(B, T, dv, **f64)
    full = [t.clone().requires_grad_() for t in (q, k, v, beta, S0)]
    o_ref, _ = delta_rule(*full)
    (o_ref * w).sum().backward()
    loc = [cp_slice(t, dims).clone().requires_grad_() for t in (q, k, v, beta)]
    s0 = S0.clone().requires_grad_()
    A, Bm = delta_rule_summary(loc[1], loc[3], loc[2])
    o, _ = delta_rule(*loc, prefix_state(A, Bm, s0, dims))
    (o * cp_slice(w, dims)).sum().backward()
    diffs = {"out": (o - cp_slice(o_ref, dims)).abs().max().item()}
    for name, a, b in zip("qkvb", loc, full):
        diffs[name] = (a.grad - cp_slice(b.grad, dims)).abs().max().item()
    g0 = s0.grad.clone()
    dist.all_reduce(g0, group=dims.cp_group)
    diffs["S0"] = (g0 - full[4].grad).abs().max().item()
    return diffs


def wavefront_worker():
    """Timestamps of the CP=2 exchanges of a 4-layer model (forward + backward), per rank."""
    import time

    from parallel import causal_targets, cp_slice, init_parallel, parallel_cross_entropy, parallelize

    dims = init_parallel(tp=1, cp=2)
    model = build_reference("linear", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(0))
    parallelize(model, dims)
    model._cp_comm.trace = []
    dist.barrier()
    t0 = time.perf_counter()
    loss, _ = parallel_cross_entropy(model(cp_slice(ids, dims)).logits, cp_slice(causal_targets(ids), dims), dims)
    t_fwd = time.perf_counter()
    loss.backward()
    dist.barrier()
    # perf_counter is CLOCK_MONOTONIC: one clock for all processes of the machine
    out = dict(trace=model._cp_comm.trace, forward_start=t0, forward_end=t_fwd)
    # prefix mode + all-gather attention: what crosses ranks point to point (no state pass)
    model = parallelize(build_reference("deltanet+attention"), dims, cp_mode="prefix")
    model._cp_comm.trace = []
    ids = ids[:, :64]
    loss, _ = parallel_cross_entropy(model(cp_slice(ids, dims)).logits, cp_slice(causal_targets(ids), dims), dims)
    loss.backward()
    out["prefix_p2p"] = sorted({(e, layer, kind) for e, layer, kind, _ in model._cp_comm.trace})
    return out


def extras_worker():
    """Eval without backward (twice: the in-flight sends are flushed by the next forward), a
    frozen embedding (layer-0 activations need no grad: the state exchange must still carry
    gradients), and bfloat16 (mixed wire dtypes) — TP=2 × CP=2."""
    import gc
    import time
    from parallel import gather_full_grads, init_parallel, parallel_cross_entropy, parallelize, reduce_gradients
    from parallel.loss import cp_slice

    dims = init_parallel(tp=2, cp=2)
    out = {}

    def full_logits(logits):
        parts = [torch.empty_like(logits) for _ in range(dims.tp)]
        dist.all_gather(parts, logits.contiguous(), group=dims.tp_group)
        return torch.cat(parts, -1)

    ref = build_reference("mlp+conv+shareqk+gate")
    ids, tgt = batch(ref.config, 40)
    par = parallelize(copy.deepcopy(ref), dims).eval()
    with torch.no_grad():
        want = cp_slice(ref(ids).logits, dims)
        diffs = []
        for i in range(2):
            if i == 1 and dims.cp_rank == 1:
                time.sleep(0.5)  # CP rank 0 finishes its 2nd forward and drops the model meanwhile
            diffs.append((full_logits(par(cp_slice(ids, dims)).logits) - want).abs().max().item())
        out["eval"] = max(diffs)
    del par  # its last sends may still be in flight: they must survive the model
    gc.collect()

    ref.model.embed_tokens.weight.requires_grad_(False)
    par = parallelize(copy.deepcopy(ref), dims)
    _, _, ref_grads, n = reference_run(copy.deepcopy(ref), ids, tgt)
    loss_sum, _ = parallel_cross_entropy(par(cp_slice(ids, dims)).logits, cp_slice(tgt, dims), dims)
    (loss_sum / n).backward()
    grads = gather_full_grads(par, dims)
    reduce_gradients(par, dims)  # dp = 1 here: the sum over CP
    reduced = gather_full_grads(par, dims, reduce_cp=False)
    out["reduce_gradients"] = max((reduced[k] - grads[k]).abs().max().item() for k in grads)
    out["frozen_embedding"] = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    out["frozen_stays_frozen"] = not par.model.embed_tokens.weight.requires_grad

    ref = build_reference("mlp+conv+shareqk+gate", dtype=torch.bfloat16)
    par = parallelize(copy.deepcopy(ref), dims)
    with torch.no_grad():
        want = cp_slice(ref(ids).logits, dims)
    logits = par(cp_slice(ids, dims)).logits
    loss_sum, _ = parallel_cross_entropy(logits, cp_slice(tgt, dims), dims)
    (loss_sum / n).backward()
    out["bf16_logits"] = (full_logits(logits.detach()) - want).abs().max().item()
    out["bf16_logits_scale"] = want.abs().max().item()
    out["bf16_grads_finite"] = all(torch.isfinite(p.grad).all().item() for p in par.parameters() if p.grad is not None)
    return out


def suite_worker(layouts, cases):
    """Everything that needs 4 processes, in one spawn (process start-up dominates on 2 cores)."""
    return dict(
        errors=errors_worker(),
        wavefront=wavefront_worker(),
        extras=extras_worker(),
        prefix={cp: prefix_worker(cp) for cp in (2, 4)},
        equivalence=equivalence_worker(layouts, cases),
        state_dict=state_dict_worker(2, 2),
    )
