"""Tensor parallelism by heads, applied to a single-device model from outside.

The plan (Megatron's, per block; ``tp`` ranks, ``H`` heads, rank r owns heads [r·H/tp, (r+1)·H/tp)):

    memory layer   x ─copy_to_tp─┬─ q_proj, k_proj, v_proj, g_proj, lr_gate   ColumnParallel (by heads)
                                 │  conv_q / conv_k (depthwise)               channels sharded
                                 │  W1 b1 [W2 b2], ttt_norm_weight/bias       sharded on the head dim
                                 │  inner scan: per head, no communication
                                 │  post_norm (LayerNorm over all C)          exact: all-reduced mean/var
                                 └─ o_proj                                    RowParallel (all-reduce)
    SwiGLU MLP     x ─copy_to_tp─┬─ gate_proj, up_proj                        ColumnParallel
                                 └─ down_proj                                 RowParallel
    embed_tokens   VocabParallelEmbedding; lm_head: ColumnParallel over the vocab (shares the
                   embedding's shard when tied); the logits stay vocab-sharded → parallel CE.

``copy_to_tp`` (identity forward, all-reduce backward) is applied once per module input and the
column-parallel layers are built with ``disable_grad_reduce=True``, so each block costs one
all-reduce per sub-module in each direction. Replicated parameters that are used *inside* the
head-sharded computation (``token_idx_offset``) get a gradient hook that sums over TP ranks.
Every sharded parameter carries megatron's ``tensor_model_parallel``/``partition_dim``
attributes, which :func:`parallel.parallelize.gather_full_state_dict` reads.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from .groups import ParallelDims


def _megatron():
    from megatron.core import tensor_parallel as tpl
    from megatron.core.model_parallel_config import ModelParallelConfig

    return tpl, ModelParallelConfig


def _config(dims: ParallelDims, like: torch.Tensor):
    _, ModelParallelConfig = _megatron()
    return ModelParallelConfig(
        tensor_model_parallel_size=dims.tp,
        use_cpu_initialization=like.device.type == "cpu",
        perform_initialization=False,  # the weights are copied from the single-device module
        params_dtype=like.dtype,
    )


def shard_of(t: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of a full tensor. ``stride`` s > 1: the dimension is s blocks laid end to
    end (e.g. [q | k | v] rows, or [θ | η | α] gate rows), each cut in tp pieces; the shard is
    rank r's piece of every block, concatenated (megatron's ``partition_stride``)."""
    blocks = t.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[rank] for b in blocks], dim=dim)


def unshard(parts: list, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_of`: the full tensor from every rank's shard, in rank order."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def _shard(t: torch.Tensor, dims: ParallelDims, dim: int, stride: int = 1) -> torch.Tensor:
    return shard_of(t.detach(), dims.tp, dims.tp_rank, dim, stride).clone()


def mark_sharded(p: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


def _no_init(_w):
    return None


_LAYOUT_ONLY = [False]  # tp_layout: plain nn.Linear/nn.Embedding shards instead of megatron layers


@contextlib.contextmanager
def _layout_only():
    _LAYOUT_ONLY[0] = True
    try:
        yield
    finally:
        _LAYOUT_ONLY[0] = False


def _plain(kind: str, in_f: int, out_f: int, bias: bool, like: torch.Tensor) -> nn.Module:
    """Layout-only stand-in of a megatron layer: the same parameter names and (sharded) shapes."""
    kw = {"device": like.device, "dtype": like.dtype}
    if kind == "emb":
        return nn.Embedding(in_f, out_f, **kw)
    return nn.Linear(in_f, out_f, bias=bias, **kw)


# ----------------------------------------------------------------------------- megatron layers
def _layer_classes():
    tpl, _ = _megatron()

    class ColumnParallel(tpl.ColumnParallelLinear):
        """megatron ColumnParallelLinear that returns only the output (nn.Linear's interface)."""

        def forward(self, x):  # noqa: D401
            return super().forward(x)[0]

    class RowParallel(tpl.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return ColumnParallel, RowParallel


_CLASSES = {}


def _classes():
    if not _CLASSES:
        _CLASSES["col"], _CLASSES["row"] = _layer_classes()
    return _CLASSES["col"], _CLASSES["row"]


def column_parallel(linear: nn.Linear, dims: ParallelDims, input_is_copied: bool = True, stride: int = 1) -> nn.Module:
    """nn.Linear → megatron ColumnParallelLinear holding this rank's rows of the weight
    (``stride``: rows made of that many blocks, each split by rank — see :func:`shard_of`)."""
    out_f, in_f = linear.weight.shape
    if out_f % (dims.tp * stride):
        raise ValueError(f"output features {out_f} are not divisible by tensor parallel size {dims.tp}"
                         + (f" × {stride} blocks" if stride > 1 else ""))
    if _LAYOUT_ONLY[0]:
        new = _plain("col", in_f, out_f // dims.tp, linear.bias is not None, linear.weight)
    else:
        col, _ = _classes()
        new = col(in_f, out_f, config=_config(dims, linear.weight), init_method=_no_init,
                  bias=linear.bias is not None, gather_output=False, disable_grad_reduce=input_is_copied)
    with torch.no_grad():
        new.weight.copy_(_shard(linear.weight, dims, 0, stride))
        if linear.bias is not None:
            new.bias.copy_(_shard(linear.bias, dims, 0, stride))
    # megatron sets these only when it initialises the weight itself (perform_initialization)
    mark_sharded(new.weight, 0, stride).requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        mark_sharded(new.bias, 0, stride).requires_grad_(linear.bias.requires_grad)
    return new.to(linear.weight.device)


def row_parallel(linear: nn.Linear, dims: ParallelDims) -> nn.Module:
    """nn.Linear → megatron RowParallelLinear (input sharded, output all-reduced)."""
    out_f, in_f = linear.weight.shape
    if in_f % dims.tp:
        raise ValueError(f"input features {in_f} are not divisible by tensor parallel size {dims.tp}")
    if linear.bias is not None:
        raise ValueError("row-parallel layers with a bias are not supported (the model has none)")
    if _LAYOUT_ONLY[0]:
        new = _plain("row", in_f // dims.tp, out_f, False, linear.weight)
    else:
        _, row = _classes()
        new = row(in_f, out_f, config=_config(dims, linear.weight), init_method=_no_init, bias=False,
                  input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        new.weight.copy_(_shard(linear.weight, dims, 1))
    mark_sharded(new.weight, 1).requires_grad_(linear.weight.requires_grad)
    return new.to(linear.weight.device)


def vocab_parallel_embedding(emb: nn.Embedding, dims: ParallelDims) -> nn.Module:
    V, C = emb.weight.shape
    if _LAYOUT_ONLY[0]:
        new = _plain("emb", V // dims.tp, C, False, emb.weight)
    else:
        tpl, _ = _megatron()
        new = tpl.VocabParallelEmbedding(V, C, init_method=_no_init, config=_config(dims, emb.weight))
    with torch.no_grad():
        new.weight.copy_(_shard(emb.weight, dims, 0))
    mark_sharded(new.weight, 0).requires_grad_(emb.weight.requires_grad)
    return new.to(emb.weight.device)


def vocab_parallel_head(head: nn.Linear, dims: ParallelDims, tied_embedding: nn.Module | None) -> nn.Module:
    """lm_head → ColumnParallel over the vocabulary; with tied weights it reuses the embedding's
    vocab shard (megatron's ``skip_weight_param_allocation`` + shared weight, as in GPTModel)."""
    V, C = head.weight.shape
    if tied_embedding is None:
        return column_parallel(head, dims, input_is_copied=False)
    if _LAYOUT_ONLY[0]:
        new = _plain("col", C, 1, False, head.weight)
    else:
        col, _ = _classes()
        new = col(C, V, config=_config(dims, head.weight), init_method=_no_init, bias=False,
                  gather_output=False, skip_weight_param_allocation=True)
    new.weight = tied_embedding.weight  # the same Parameter: gradients of both uses accumulate
    return new


# --------------------------------------------------------------------------- autograd helpers
class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; the gradient is summed over the group in backward too (every
    rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, -1)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), -1)[dist.get_rank(group)].contiguous()


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim (backward: keep this rank's slice) — megatron's
    gather_from_tensor_model_parallel_region, which allocates on CUDA, written device-agnostic."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _ScatterLast(torch.autograd.Function):
    """Keep this rank's slice of the last dim (backward: all-gather) — megatron's
    scatter_to_tensor_model_parallel_region, device-agnostic."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherLast.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterLast.apply(x, group)


class TPLayerNorm(nn.Module):
    """LayerNorm over a feature dimension that is sharded across TP ranks — exact.

    Two all-reduces (mean, then the centred second moment) give the same statistics as
    ``nn.LayerNorm`` over the full width; weight and bias hold this rank's channels.
    """

    def __init__(self, norm: nn.LayerNorm, dims: ParallelDims):
        super().__init__()
        (self.full_width,) = norm.normalized_shape
        self.eps, self.group = norm.eps, dims.tp_group
        self.weight = nn.Parameter(_shard(norm.weight, dims, 0), requires_grad=norm.weight.requires_grad)
        self.bias = nn.Parameter(_shard(norm.bias, dims, 0), requires_grad=norm.bias.requires_grad)
        mark_sharded(self.weight, 0)
        mark_sharded(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        mean = all_reduce_sum(x.sum(-1, keepdim=True), self.group) / self.full_width
        xc = x - mean
        var = all_reduce_sum((xc * xc).sum(-1, keepdim=True), self.group) / self.full_width
        y = xc * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(dtype)


def _copy_input_hook(module, args, kwargs):
    tpl, _ = _megatron()
    args = (tpl.copy_to_tensor_model_parallel_region(args[0], group=module._tp_group), *args[1:])
    return args, kwargs


def _grad_sum_hook(group):
    def hook(g):
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g

    return hook


def _shard_param(module: nn.Module, name: str, dims: ParallelDims, dim: int = 0) -> None:
    p = getattr(module, name)
    if p.shape[dim] % dims.tp:
        raise ValueError(f"{type(module).__name__}.{name} dim {dim} of size {p.shape[dim]} is not divisible by tp={dims.tp}")
    new = nn.Parameter(_shard(p, dims, dim), requires_grad=p.requires_grad)
    mark_sharded(new, dim)
    setattr(module, name, new)


# ------------------------------------------------------------------------------- the TP plans
def check_tp(config, dims: ParallelDims) -> None:
    """Clear errors for sizes tensor parallelism cannot split."""
    tp = dims.tp
    checks = [
        ("num_attention_heads", config.num_attention_heads),
        ("vocab_size", config.vocab_size),
        ("intermediate_size", config.intermediate_size),
    ]
    from models.layers.registry import layer_spec

    for name in sorted({n for t in set(getattr(config, "mixer_types", ())) for n in layer_spec(t).tp_divisible}):
        checks.append((name, getattr(config, name)))
    for name, value in checks:
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size tp={tp}")


def _check_heads(what: str, heads: int, dims: ParallelDims) -> None:
    if heads % dims.tp:
        raise ValueError(f"{what}={heads} is not divisible by tensor parallel size tp={dims.tp}")


def _replicated_in_sharded(p: nn.Parameter, dims: ParallelDims) -> None:
    """A replicated parameter used inside the head-sharded computation: each TP rank computes
    its heads' share of the gradient, so the gradient is summed over TP."""
    if p.requires_grad and not getattr(p, "tp_grad_summed", False):
        p.register_hook(_grad_sum_hook(dims.tp_group))
        p.tp_grad_summed = True


def _copy_input(module: nn.Module, dims: ParallelDims) -> None:
    """copy_to_tp on the module's (replicated) input: identity forward, all-reduce backward. Exactly
    once per replicated → column-parallel edge."""
    module._tp_group = dims.tp_group
    module.register_forward_pre_hook(_copy_input_hook, with_kwargs=True)


def _shard_conv(conv: nn.Module, dims: ParallelDims) -> None:
    _shard_param(conv, "weight", dims, 0)
    _shard_param(conv, "bias", dims, 0)


def tp_ttt_layer(layer: nn.Module, dims: ParallelDims, copy_input: bool = True) -> None:
    """Shards a models.layers.ttt.TTTLayer by heads, in place."""
    H, tp = layer.num_heads, dims.tp
    _check_heads("num_heads", H, dims)
    for name in ("q_proj", "k_proj", "v_proj", "g_proj", "lr_gate"):
        if hasattr(layer, name):
            setattr(layer, name, column_parallel(getattr(layer, name), dims))
    layer.o_proj = row_parallel(layer.o_proj, dims)
    for conv in ("conv_q", "conv_k"):
        if hasattr(layer, conv):
            _shard_conv(getattr(layer, conv), dims)
    for name in [*layer.fast_weight_names, "ttt_norm_weight", "ttt_norm_bias"]:
        _shard_param(layer, name, dims, 0)
    _replicated_in_sharded(layer.token_idx_offset, dims)  # one vector shared by all heads
    layer.post_norm = TPLayerNorm(layer.post_norm, dims)  # LayerNorm over ALL heads: exact statistics
    layer.num_heads = H // tp
    layer.hidden_size = layer.num_heads * layer.head_dim  # local width
    if copy_input:
        _copy_input(layer, dims)


def apply_tp_plan(layer: nn.Module, plan, dims: ParallelDims, copy_input: bool = True) -> None:
    """A declarative plan (models.layers.registry.TPPlan) by heads: its column-parallel projections, the
    short convs' channels, per-head parameters; the shared parameters' gradients summed over TP; the
    row-parallel output projection. Names a module does not have are skipped."""
    _check_heads("num_heads", layer.num_heads, dims)
    for name in plan.column:
        if hasattr(layer, name):
            setattr(layer, name, column_parallel(getattr(layer, name), dims))
    for conv in plan.convs:
        if hasattr(layer, conv):
            _shard_conv(getattr(layer, conv), dims)
    for name in plan.heads:
        if hasattr(layer, name):
            _shard_param(layer, name, dims, 0)
    for name in plan.shared:
        _replicated_in_sharded(layer.get_parameter(name), dims)
    for name in plan.row:
        setattr(layer, name, row_parallel(getattr(layer, name), dims))
    layer.num_heads //= dims.tp
    layer.hidden_size = layer.num_heads * layer.head_dim
    if copy_input:
        _copy_input(layer, dims)


def tp_attention(layer: nn.Module, dims: ParallelDims, copy_input: bool = True) -> None:
    """models.common.attention.AttentionLayer by heads (q/k/v column-, o row-parallel). The persistent
    tokens and the q/k RMSNorm weights are shared by all heads: gradients summed over TP."""
    _check_heads("num_heads", layer.num_heads, dims)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(layer, name, column_parallel(getattr(layer, name), dims))
    layer.o_proj = row_parallel(layer.o_proj, dims)
    if layer.qk_norm:
        _replicated_in_sharded(layer.q_norm.weight, dims)
        _replicated_in_sharded(layer.k_norm.weight, dims)
    if layer.num_persistent:
        _replicated_in_sharded(layer.persistent, dims)  # projected by the column-parallel k/v
    layer.num_heads //= dims.tp
    layer.hidden_size = layer.num_heads * layer.head_dim
    if copy_input:
        _copy_input(layer, dims)


def tp_titans_memory(mem: nn.Module, dims: ParallelDims, copy_input: bool = True) -> None:
    """models.layers.titans.TitansMemory by heads. ``gates`` is [θ | η | α] × heads: sharded with stride 3
    (each rank keeps its heads' rows of all three). Memory weights W1..WL by head."""
    _check_heads("num_heads", mem.num_heads, dims)
    for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
        setattr(mem, name, column_parallel(getattr(mem, name), dims))
    mem.gates = column_parallel(mem.gates, dims, stride=3)
    for conv in ("conv_q", "conv_k", "conv_v"):
        _shard_conv(getattr(mem, conv), dims)
    for name in mem.fast_weight_names:
        _shard_param(mem, name, dims, 0)
    _replicated_in_sharded(mem.o_norm.weight, dims)
    mem.o_proj = row_parallel(mem.o_proj, dims)
    mem.num_heads //= dims.tp
    mem.hidden_size = mem.num_heads * mem.head_dim
    if copy_input:
        _copy_input(mem, dims)


class TPGate:
    """Mixin for Titans' ``_Gate``: W (norm(a) ⊙ σ(norm(m))) with a, m replicated (outputs of
    row-parallel layers). The two RMSNorms run over the full width on every rank (exact; their
    gradients are whole on every rank), the product is split by channel (megatron's scatter:
    backward all-gathers) into a row-parallel W."""

    def forward(self, a, m):
        z = self.norm_a(a) * torch.sigmoid(self.norm_m(m))
        return self.proj(scatter_to_tp(z, self._tp_group))


def tp_gate(gate: nn.Module, dims: ParallelDims) -> None:
    from .context import swap_class

    gate.proj = row_parallel(gate.proj, dims)
    gate._tp_group = dims.tp_group
    swap_class(gate, TPGate)


class TPTitansMAC:
    """Mixin for TitansMAC: the retrieved tokens r (this rank's heads of M(q̃)) are all-gathered
    over TP (backward: split) because the attention projects them like input tokens, then copied
    into the column-parallel q/k/v (backward: all-reduce of the heads' partial gradients)."""

    def retrieve(self, x, weights):
        tpl, _ = _megatron()
        r = super().retrieve(x, weights)
        r = gather_from_tp(r, self._tp_group)
        return tpl.copy_to_tensor_model_parallel_region(r, group=self._tp_group)


def tp_titans_block(block: nn.Module, dims: ParallelDims) -> None:
    """TitansMAG / TitansMAL / TitansMAC (models/layers/titans.py): memory and attention by heads, the
    full-width norms and gates exact (they act on all-reduced, replicated tensors)."""
    from models.layers.titans import TitansMAC, TitansMAG, TitansMAL

    from .context import swap_class

    if isinstance(block, TitansMAG):  # both read x: one copy_to_tp for the pair
        tp_attention(block.attention, dims, copy_input=False)
        tp_titans_memory(block.memory, dims, copy_input=False)
        tp_gate(block.gate, dims)
        _copy_input(block, dims)
    elif isinstance(block, TitansMAL):  # memory(x), then attention(norm(m)): two replicated inputs
        tp_titans_memory(block.memory, dims, copy_input=False)  # MAL calls memory.prepare, not memory(x)
        tp_attention(block.attention, dims)
        _copy_input(block, dims)
    elif isinstance(block, TitansMAC):
        tp_titans_memory(block.memory, dims)  # reads RMSNorm(y): y replicated
        tp_attention(block.attention, dims, copy_input=False)  # reads x (copied below) and r (gathered)
        block.retrieve_q = column_parallel(block.retrieve_q, dims)
        _replicated_in_sharded(block.retrieve_norm.weight, dims)
        tp_gate(block.gate, dims)
        block._tp_group = dims.tp_group
        swap_class(block, TPTitansMAC)
        _copy_input(block, dims)
    else:  # pragma: no cover
        raise ValueError(f"no tensor-parallel plan for {type(block).__name__}")


def tp_lact(layer: nn.Module, dims: ParallelDims, copy_input: bool = True) -> None:
    """models.layers.lact.LaCTLayer by heads. The shared [q | k | v] projection is sharded with stride 3;
    rank r's channels are attention heads r·nh/tp.. and fast-weight heads r·nl/tp.. at once (both
    must be divisible by tp). Per-channel q/k scale/offset by channel, W0/W1/W2 by fast head,
    per-head gates column-parallel; the fast-weight RMSNorm's weight is shared (gradient summed)."""
    _check_heads("num_attn_heads", layer.num_heads, dims)
    _check_heads("lact_num_heads", layer.num_lact_heads, dims)
    layer.qkv = column_parallel(layer.qkv, dims, stride=3)
    for name in ("lr_proj", "momentum_proj", "scale_proj"):
        if hasattr(layer, name):
            setattr(layer, name, column_parallel(getattr(layer, name), dims))
    _shard_param(layer, "qk_scale", dims, 1)
    _shard_param(layer, "qk_offset", dims, 1)
    for name in ("W0", "W1", "W2"):
        _shard_param(layer, name, dims, 0)
    _replicated_in_sharded(layer.ttt_norm.weight, dims)
    layer.o_proj = row_parallel(layer.o_proj, dims)
    layer.num_heads //= dims.tp
    layer.num_lact_heads //= dims.tp
    layer.hidden_size //= dims.tp
    if copy_input:
        _copy_input(layer, dims)


def tp_tnt(layer: nn.Module, dims: ParallelDims, copy_input: bool = True) -> None:
    """models.layers.tnt.TNTLayer by heads, as a Titans memory: q/k/v/g column-parallel, ``gates`` is
    [θ | η | α] × heads for each of the 1 + N memories (stride 3·(1 + N)), every memory's initial
    weights and the convs by head/channel, o_proj row-parallel."""
    _check_heads("num_heads", layer.num_heads, dims)
    for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
        setattr(layer, name, column_parallel(getattr(layer, name), dims))
    layer.gates = column_parallel(layer.gates, dims, stride=3 * layer.num_memories)
    for conv in ("conv_q", "conv_k", "conv_v"):
        _shard_conv(getattr(layer, conv), dims)
    for name in layer.fast_weight_names:
        _shard_param(layer, name, dims, 0)
    _replicated_in_sharded(layer.o_norm.weight, dims)
    layer.o_proj = row_parallel(layer.o_proj, dims)
    layer.num_heads //= dims.tp
    layer.hidden_size = layer.num_heads * layer.head_dim
    if copy_input:
        _copy_input(layer, dims)


class TPCMSLevel:
    """Mixin for Hope's CMS level: its input h is replicated (a row-parallel output); the level's own
    heads read this rank's channels of it, its projections the whole of it, both through one
    copy_to_tp (the residual h + … keeps the uncopied h, so its gradient is not summed twice)."""

    def split_input(self, h):
        tpl, _ = _megatron()
        hc = tpl.copy_to_tensor_model_parallel_region(h, group=self._tp_group)
        C = self.hidden_size
        return hc[..., self._tp_rank * C : (self._tp_rank + 1) * C], hc


def tp_hope(layer: nn.Module, dims: ParallelDims) -> None:
    """models.layers.hope.HopeLayer by heads: q/u/g column-parallel, the five memories' initial weights and
    the rate biases by head, o_proj row-parallel; each CMS level: v_proj/lr_gate column-parallel,
    its fast weights by head, o_proj row-parallel, its heads read this rank's channels (TPCMSLevel)."""
    from .context import swap_class

    _check_heads("num_heads", layer.num_heads, dims)
    for name in ("q_proj", "u_proj", "g_proj"):
        setattr(layer, name, column_parallel(getattr(layer, name), dims))
    for conv in ("conv_q", "conv_u"):
        _shard_conv(getattr(layer, conv), dims)
    for name in [*layer.fast_weight_names, "lr_bias", "decay_bias"]:
        _shard_param(layer, name, dims, 0)
    _replicated_in_sharded(layer.o_norm.weight, dims)
    layer.o_proj = row_parallel(layer.o_proj, dims)
    for level in layer.cms:
        level.v_proj = column_parallel(level.v_proj, dims)
        level.lr_gate = column_parallel(level.lr_gate, dims)
        for name in level.fast_weight_names:
            _shard_param(level, name, dims, 0)
        _replicated_in_sharded(level.o_norm.weight, dims)
        level.o_proj = row_parallel(level.o_proj, dims)
        level.num_heads //= dims.tp
        level.hidden_size = level.num_heads * level.head_dim
        level._tp_group, level._tp_rank = dims.tp_group, dims.tp_rank
        swap_class(level, TPCMSLevel)
    layer.num_heads //= dims.tp
    layer.hidden_size = layer.num_heads * layer.head_dim
    _copy_input(layer, dims)


def tp_miras_atlas(layer: nn.Module, dims: ParallelDims) -> None:
    """models.layers.miras.MirasLayer (Moneta/Yaad/Memora) and models.layers.atlas.AtlasLayer by heads: q/k/v/g
    column-parallel, ``gates`` ([η | retention | (δ)] or [η | θ | α | γ] × heads) sharded with the
    number of gate blocks as stride, convs by channel, the memory's initial weights (and Miras's LN,
    ATLAS's feature coefficients) by head, o_proj row-parallel."""
    _check_heads("num_heads", layer.num_heads, dims)
    for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
        setattr(layer, name, column_parallel(getattr(layer, name), dims))
    layer.gates = column_parallel(layer.gates, dims, stride=layer.gates.out_features // layer.num_heads)
    for conv in ("conv_q", "conv_k", "conv_v"):
        _shard_conv(getattr(layer, conv), dims)
    for name in ("W1", "W2", "ln_weight", "ln_bias", "poly_coef"):
        if hasattr(layer, name):
            _shard_param(layer, name, dims, 0)
    _replicated_in_sharded(layer.o_norm.weight, dims)
    layer.o_proj = row_parallel(layer.o_proj, dims)
    layer.num_heads //= dims.tp
    layer.hidden_size = layer.num_heads * layer.head_dim
    _copy_input(layer, dims)


def tp_mixer(mixer: nn.Module, dims: ParallelDims, layer_type: str) -> None:
    """The TP plan its layer type registered (models/layers/registry.py): a TPPlan, or one of the plan
    functions of this file by name. Splitting by heads needs heads that do not interact in the scan."""
    from models.layers.registry import layer_spec

    spec = layer_spec(layer_type)
    if not spec.heads_independent:
        raise ValueError(f"{layer_type}: its heads interact inside the scan, so it has no tensor-parallel plan by heads")
    plan = spec.tp
    if isinstance(plan, str):
        globals()[plan](mixer, dims)
    else:
        apply_tp_plan(mixer, plan, dims)


def tp_swiglu(mlp: nn.Module, dims: ParallelDims) -> None:
    mlp.gate_proj = column_parallel(mlp.gate_proj, dims)
    mlp.up_proj = column_parallel(mlp.up_proj, dims)
    mlp.down_proj = row_parallel(mlp.down_proj, dims)
    _copy_input(mlp, dims)


def apply_tp(model: nn.Module, dims: ParallelDims) -> None:
    """Applies the plan above to a MemoryLMForCausalLM (or MemoryLMModel), in place."""
    check_tp(model.config, dims)
    base = model.model if hasattr(model, "model") else model
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is base.embed_tokens.weight
    base.embed_tokens = vocab_parallel_embedding(base.embed_tokens, dims)
    if head is not None:
        model.lm_head = vocab_parallel_head(head, dims, base.embed_tokens if tied else None)
    for block, layer_type in zip(base.layers, model.config.mixer_types):
        tp_mixer(block.mixer, dims, layer_type)
        tp_swiglu(block.mlp, dims)


def tp_layout(model: nn.Module, tp: int) -> dict:
    """``{single-device state_dict name: (partition_dim, partition_stride)}`` of every tensor that
    the plan above shards over ``tp`` ranks — offline, without a process group (for merging the
    per-rank shards of a TP checkpoint with :func:`unshard`). Consumes ``model``: pass a fresh
    single-device model, ideally built on the meta device (only names and shapes are used)."""
    with _layout_only():
        apply_tp(model, ParallelDims(tp=tp))
    return {name: (t.partition_dim, getattr(t, "partition_stride", 1))
            for name, t in model.state_dict(keep_vars=True).items() if getattr(t, "tensor_model_parallel", False)}
