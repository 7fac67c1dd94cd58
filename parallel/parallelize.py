"""parallelize(model, dims, cp_mode): TP and CP applied to a single-device model from outside.

    model = MemoryLMForCausalLM(config)                  # plain single-device model, full weights
    dims = init_parallel(tp=2, cp=2)
    parallelize(model, dims, cp_mode="pass")            # in place; returns model
    ids = cp_slice(batch, dims); tgt = cp_slice(causal_targets(batch), dims)
    logits = model(ids).logits                          # this rank's piece, vocab-sharded under TP
    loss_sum, n = parallel_cross_entropy(logits, tgt, dims)
    global_mean_loss(loss_sum, n, dims).backward()      # then sum grads over dims.dp_cp_group

cp_mode: ``"pass"`` — the state-passing wavefront (parallel/context.py, any CP size);
``"ulysses"`` — head all-to-all (parallel/ulysses.py, CP must divide heads/TP);
``"2d"`` — Ulysses inside head groups of ``dims.cp_heads`` ranks, the state pass of each head shard
along the sequence groups (parallel/context2d.py; every layer whose scan runs on a slice of its heads);
``"prefix"`` — all-gather + prefix combine, only for memory layers whose update is affine in the
state (DeltaNet, Gated DeltaNet; attention layers beside them use all-gather / halo attention);
TTT, Titans and LaCT are not affine in their state, so it is refused for them (parallel/prefix.py).
Full-attention layers use all-gather attention in every mode, sliding windows a halo exchange
(parallel/context.py: ``CPAttention``).

Every rank builds the same full model (same seed or the same checkpoint) before the call;
parallelize keeps this rank's shards. ``gather_full_state_dict`` / ``load_full_state_dict`` go
between the sharded model and the single-device layout (names and shapes of the original model).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .context import CPAttention, CPBlock, CPComm, CPPassMixer, CPPrefixDeltaNet, swap_class
from .context2d import CP2DMixer, check_2d, scan_heads_of, seq_channel
from .groups import ParallelDims
from .tensor import apply_tp, check_tp, shard_of, unshard
from .ulysses import UlyssesTTT, check_ulysses

CP_MODES = ("pass", "ulysses", "prefix", "2d")


def apply_cp(model, dims: ParallelDims, cp_mode: str = "pass") -> CPComm:
    """Makes every block of ``model`` context-parallel, in place; returns the channel.

    Every memory mixer (models/common/state.py: prepare → scan → output) gets the scan-level state pass
    (``"pass"``); TTT can take Ulysses instead, DeltaNet layers the prefix combine under
    ``"prefix"``; under ``"2d"`` every memory mixer gets ``CP2DMixer`` (heads × sequence,
    parallel/context2d.py); attention layers: all-gather (full) or halo (sliding window) attention."""
    from models.common.attention import AttentionLayer
    from models.layers.deltanet import DeltaNetLayer
    from models.common.state import Mixer
    from models.layers.ttt import TTTLayer

    base = model.model if hasattr(model, "model") else model
    comm = CPComm(dims)
    seq = seq_channel(dims) if cp_mode == "2d" else None
    for block, layer_type in zip(base.layers, model.config.mixer_types):
        block._cp_comm = comm
        m = block.mixer
        m._cp_comm, m._cp_layer_idx = comm, block.layer_idx
        swap_class(block, CPBlock)
        if isinstance(m, AttentionLayer):
            mixin = CPAttention
        elif seq is not None:
            m._cp_scan2d, m._cp_heads2d = scan_heads_of(model.config, layer_type, dims.tp)
            m._cp_seq_comm, mixin = seq, CP2DMixer
        elif isinstance(m, TTTLayer) and cp_mode == "ulysses":
            mixin = UlyssesTTT
        elif isinstance(m, DeltaNetLayer) and cp_mode == "prefix":
            mixin = CPPrefixDeltaNet
        elif isinstance(m, Mixer):
            mixin = CPPassMixer
        else:
            raise ValueError(f"{type(m).__name__} is not a models.common.state.Mixer (prepare/scan/output): no context "
                             "parallelism for it")
        m._cp_base_cls = type(m)  # its forward without CP exchanges (CPBlock's packed-document path)
        swap_class(m, mixin)
    return comm


def _mixer_kinds(model):
    """{"ttt" | "affine" | "attention" | "other": mixer class names}, from each layer type's registered
    CP strategy (models/layers/registry.py): the scan-level TTT pass, prefix-capable (affine state update),
    attention, or the generic state pass."""
    from models.layers.registry import layer_spec

    base = model.model if hasattr(model, "model") else model
    kinds = {}
    for b, layer_type in zip(base.layers, model.config.mixer_types):
        spec = layer_spec(layer_type)
        kind = ("ttt" if spec.cp == "ttt_pass" else "affine" if spec.prefix
                else "attention" if spec.cp == "attention" else "other")
        kinds.setdefault(kind, set()).add(type(b.mixer).__name__)
    return kinds


def _check(model, dims: ParallelDims, cp_mode: str) -> None:
    if cp_mode not in CP_MODES:
        raise ValueError(f"unknown cp_mode {cp_mode!r}; expected one of {CP_MODES}")
    kinds = _mixer_kinds(model)
    if dims.cp_heads > 1 and cp_mode != "2d":
        raise ValueError(f"cp_heads={dims.cp_heads} splits the CP group for cp_mode='2d', not {cp_mode!r}")
    if dims.tp > 1:
        check_tp(model.config, dims)
    if dims.cp > 1 and cp_mode == "2d":
        check_2d(model, dims)
    cfg = model.config
    knobs = (int(getattr(cfg, "inner_steps", 1) or 1) != 1 or getattr(cfg, "inner_loss", None) is not None
             or bool(getattr(cfg, "inner_init_pull", 0)) or bool(getattr(cfg, "inner_lr_decay", 0)))
    if dims.tp > 1 and "affine" in kinds and int(getattr(cfg, "inner_steps", 1) or 1) > 1:
        raise ValueError("inner_steps > 1 (DeltaProduct) is not supported under tensor parallelism: its K-times-wider "
                         "k/v/β projections are not laid out by heads")
    if dims.cp > 1 and cp_mode == "prefix" and "affine" in kinds and knobs:
        raise ValueError("cp_mode='prefix' does not take the inner-loop knobs (inner_steps, inner_init_pull, "
                         "inner_lr_schedule, inner_loss) of DeltaNet: use cp_mode='pass'")
    if dims.cp > 1:
        if cp_mode == "prefix":
            bad = sorted(kinds.get("ttt", set()) | kinds.get("other", set()))
            if bad:
                raise ValueError(f"cp_mode='prefix' (all-gather + prefix combine) needs memory layers whose state update is "
                                 f"affine in the state (DeltaNet, Gated DeltaNet); {bad} are not (TTT: LayerNorm in the "
                                 "inner loss; Titans: the MLP memory's gradient; LaCT: Newton–Schulz and weight norm): "
                                 "use cp_mode='pass'")
        if cp_mode == "ulysses":
            other = sorted(set().union(*(v for k, v in kinds.items() if k != "ttt")))
            if other:
                raise ValueError(f"cp_mode='ulysses' is implemented for TTT mixers only; this model also has {other}: "
                                 "use cp_mode='pass'")
            check_ulysses(model.config.num_attention_heads // dims.tp, dims.cp)


def _pre_forward_check(module, args, kwargs):
    dims = module._parallel_dims
    if kwargs.get("labels") is not None:
        raise ValueError("a parallelized model computes no loss: pass labels to parallel.loss.parallel_cross_entropy")
    if dims.cp > 1:
        if kwargs.get("memory_state") is not None:
            raise ValueError("under context parallelism each rank starts from its neighbour's state: memory_state must be None")
        base = module.model if hasattr(module, "model") else module
        if getattr(base, "gradient_checkpointing", False) and module.training:
            raise ValueError("block-level gradient checkpointing would re-run the CP exchanges in backward; "
                             "use scan_checkpoint_group_size instead")
        module._cp_comm.flush()  # sends of the previous step (eval has no backward to flush them)
        _cp_doc_starts(module, kwargs, dims)
    return args, kwargs


def _cp_doc_starts(module, kwargs: dict, dims: ParallelDims) -> None:
    """Packed documents under CP: ``doc_ids`` (numbered over the whole row, as the loader gives them)
    → this piece's ``doc_starts``, column 0 included (a start iff the id differs from the last id of
    rank r−1's piece: one all-gather); ``comm.varlen`` ← whether any rank's piece holds a start (one
    all-reduce), so that every rank takes the same exchange path. All CP ranks pass the same kind of
    argument; with neither, nothing is exchanged."""
    from models.common.varlen import doc_starts_from_ids

    comm = module._cp_comm
    comm.varlen = False
    resolved = kwargs.pop("cp_documents", None)
    if resolved is not None:  # resolved before the forwards: no collective here (parallel/interleave.py)
        kwargs["doc_ids"], kwargs["doc_starts"] = None, resolved[0]
        comm.varlen = resolved[1]
        return
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("under context parallelism mark documents with doc_ids [batch, seq] (numbered over the "
                         "whole row) or doc_starts, not cu_seqlens")
    doc_ids, starts = kwargs.get("doc_ids"), kwargs.get("doc_starts")
    if doc_ids is None and starts is None:
        return
    if doc_ids is not None and starts is not None:
        raise ValueError("pass at most one of doc_ids, doc_starts")
    if doc_ids is not None:
        starts = doc_starts_from_ids(doc_ids)
        last = doc_ids[:, -1].contiguous()
        parts = [torch.empty_like(last) for _ in range(dims.cp)]
        dist.all_gather(parts, last, group=dims.cp_group)
        if dims.cp_rank > 0:
            starts[:, 0] = doc_ids[:, 0] != parts[dims.cp_rank - 1]
    elif dims.cp_rank == 0:  # rank 0 has no incoming state to drop
        starts = starts.clone()
        starts[:, 0] = False
    flag = starts.any().to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dims.cp_group)
    comm.varlen = bool(flag.item())
    kwargs["doc_ids"], kwargs["doc_starts"] = None, starts.cpu()


def parallelize(model, dims: ParallelDims, cp_mode: str = "pass"):
    """Applies tensor parallelism (by heads) and context parallelism to ``model`` in place."""
    _check(model, dims, cp_mode)
    if getattr(model, "_parallel_dims", None) is not None:
        raise ValueError("model is already parallelized")
    model._full_state_keys = [k for k in model.state_dict().keys()]
    if dims.tp > 1:
        apply_tp(model, dims)
    if dims.cp > 1:
        model._cp_comm = apply_cp(model, dims, cp_mode)
    model._parallel_dims, model._cp_mode = dims, cp_mode
    model.register_forward_pre_hook(_pre_forward_check, with_kwargs=True)
    return model


# ------------------------------------------------------------------------- single-device layout
def _gather_tp(t: torch.Tensor, like: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if dims.tp == 1 or not getattr(like, "tensor_model_parallel", False):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=dims.tp_group)
    return unshard(parts, like.partition_dim, getattr(like, "partition_stride", 1))


def gather_full_state_dict(model, dims: ParallelDims) -> dict:
    """The single-device state_dict (names and full shapes) of a parallelized model.

    Collective over the TP group (every TP rank must call it); CP/DP ranks hold replicas."""
    sd = model.state_dict(keep_vars=True)
    out = {name: _gather_tp(t, t, dims) for name, t in sd.items() if not name.endswith("_extra_state")}
    keys = getattr(model, "_full_state_keys", None)
    if keys is not None and set(keys) != set(out):
        raise RuntimeError(f"state_dict keys changed under parallelize: {sorted(set(keys) ^ set(out))}")
    return out


def gather_full_grads(model, dims: ParallelDims, reduce_cp: bool = True) -> dict:
    """Full-shape gradients by single-device name (gathered over TP; summed over CP if asked).
    For tests and debugging."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = _gather_tp(g, p, dims)
        if reduce_cp and dims.cp > 1:
            dist.all_reduce(g, group=dims.cp_group)
        out[name] = g
    return out


def reduce_gradients(model, dims: ParallelDims) -> None:
    """Sums every parameter's gradient over DP × CP (for trainers without DeepSpeed/DDP; with
    ``global_mean_loss`` the result is the full batch's mean-loss gradient). One flat all-reduce."""
    if dims.dp * dims.cp == 1:
        return
    # every rank must contribute the same list: a parameter this rank did not touch (the initial
    # fast weights on CP ranks > 0, which start from a received state) counts as a zero gradient
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=dims.dp_cp_group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def load_full_state_dict(model, full: dict, dims: ParallelDims, strict: bool = True) -> None:
    """Loads a single-device state_dict into a parallelized model (keeps this rank's shards)."""
    own = model.state_dict(keep_vars=True)
    sharded = {}
    for name, t in own.items():
        if name.endswith("_extra_state"):
            continue
        if name not in full:
            if strict:
                raise KeyError(f"missing {name} in the full state_dict")
            continue
        src = full[name]
        if dims.tp > 1 and getattr(t, "tensor_model_parallel", False):
            src = shard_of(src, dims.tp, dims.tp_rank, t.partition_dim, getattr(t, "partition_stride", 1))
        if src.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(src.shape)} does not fit {tuple(t.shape)}")
        sharded[name] = src
    model.load_state_dict(sharded, strict=False)
