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


def _shard(t: torch.Tensor, dims: ParallelDims, dim: int) -> torch.Tensor:
    return t.detach().chunk(dims.tp, dim=dim)[dims.tp_rank].clone()


def mark_sharded(p: torch.Tensor, dim: int) -> torch.Tensor:
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return p


def _no_init(_w):
    return None


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


def column_parallel(linear: nn.Linear, dims: ParallelDims, input_is_copied: bool = True) -> nn.Module:
    """nn.Linear → megatron ColumnParallelLinear holding this rank's rows of the weight."""
    col, _ = _classes()
    out_f, in_f = linear.weight.shape
    if out_f % dims.tp:
        raise ValueError(f"output features {out_f} are not divisible by tensor parallel size {dims.tp}")
    new = col(in_f, out_f, config=_config(dims, linear.weight), init_method=_no_init,
              bias=linear.bias is not None, gather_output=False, disable_grad_reduce=input_is_copied)
    with torch.no_grad():
        new.weight.copy_(_shard(linear.weight, dims, 0))
        if linear.bias is not None:
            new.bias.copy_(_shard(linear.bias, dims, 0))
    # megatron sets these only when it initialises the weight itself (perform_initialization)
    mark_sharded(new.weight, 0).requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        mark_sharded(new.bias, 0).requires_grad_(linear.bias.requires_grad)
    return new.to(linear.weight.device)


def row_parallel(linear: nn.Linear, dims: ParallelDims) -> nn.Module:
    """nn.Linear → megatron RowParallelLinear (input sharded, output all-reduced)."""
    _, row = _classes()
    out_f, in_f = linear.weight.shape
    if in_f % dims.tp:
        raise ValueError(f"input features {in_f} are not divisible by tensor parallel size {dims.tp}")
    if linear.bias is not None:
        raise ValueError("row-parallel layers with a bias are not supported (the model has none)")
    new = row(in_f, out_f, config=_config(dims, linear.weight), init_method=_no_init, bias=False,
              input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        new.weight.copy_(_shard(linear.weight, dims, 1))
    mark_sharded(new.weight, 1).requires_grad_(linear.weight.requires_grad)
    return new.to(linear.weight.device)


def vocab_parallel_embedding(emb: nn.Embedding, dims: ParallelDims) -> nn.Module:
    tpl, _ = _megatron()
    V, C = emb.weight.shape
    new = tpl.VocabParallelEmbedding(V, C, init_method=_no_init, config=_config(dims, emb.weight))
    with torch.no_grad():
        new.weight.copy_(_shard(emb.weight, dims, 0))
    mark_sharded(new.weight, 0).requires_grad_(emb.weight.requires_grad)
    return new.to(emb.weight.device)


def vocab_parallel_head(head: nn.Linear, dims: ParallelDims, tied_embedding: nn.Module | None) -> nn.Module:
    """lm_head → ColumnParallel over the vocabulary; with tied weights it reuses the embedding's
    vocab shard (megatron's ``skip_weight_param_allocation`` + shared weight, as in GPTModel)."""
    col, _ = _classes()
    V, C = head.weight.shape
    if tied_embedding is None:
        return column_parallel(head, dims, input_is_copied=False)
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
    for name, value in checks:
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size tp={tp}")


def tp_ttt_layer(layer: nn.Module, dims: ParallelDims) -> None:
    """Shards a models.ttt.TTTLayer by heads, in place."""
    H, tp = layer.num_heads, dims.tp
    if H % tp:
        raise ValueError(f"num_heads={H} is not divisible by tensor parallel size tp={tp}")
    for name in ("q_proj", "k_proj", "v_proj", "g_proj", "lr_gate"):
        if hasattr(layer, name):
            setattr(layer, name, column_parallel(getattr(layer, name), dims))
    layer.o_proj = row_parallel(layer.o_proj, dims)
    for conv in ("conv_q", "conv_k"):
        if hasattr(layer, conv):
            _shard_param(getattr(layer, conv), "weight", dims, 0)
            _shard_param(getattr(layer, conv), "bias", dims, 0)
    for name in [*layer.fast_weight_names, "ttt_norm_weight", "ttt_norm_bias"]:
        _shard_param(layer, name, dims, 0)
    layer.token_idx_offset.register_hook(_grad_sum_hook(dims.tp_group))  # shared by all heads
    layer.token_idx_offset.tp_grad_summed = True
    layer.post_norm = TPLayerNorm(layer.post_norm, dims)
    layer.num_heads = H // tp
    layer.hidden_size = layer.num_heads * layer.head_dim  # local width
    layer._tp_group = dims.tp_group
    layer.register_forward_pre_hook(_copy_input_hook, with_kwargs=True)


def tp_swiglu(mlp: nn.Module, dims: ParallelDims) -> None:
    mlp.gate_proj = column_parallel(mlp.gate_proj, dims)
    mlp.up_proj = column_parallel(mlp.up_proj, dims)
    mlp.down_proj = row_parallel(mlp.down_proj, dims)
    mlp._tp_group = dims.tp_group
    mlp.register_forward_pre_hook(_copy_input_hook, with_kwargs=True)


def apply_tp(model: nn.Module, dims: ParallelDims) -> None:
    """Applies the plan above to a MemoryLMForCausalLM (or MemoryLMModel), in place."""
    check_tp(model.config, dims)
    base = model.model if hasattr(model, "model") else model
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is base.embed_tokens.weight
    base.embed_tokens = vocab_parallel_embedding(base.embed_tokens, dims)
    if head is not None:
        model.lm_head = vocab_parallel_head(head, dims, base.embed_tokens if tied else None)
    for block in base.layers:
        tp_ttt_layer(block.mixer, dims)
        tp_swiglu(block.mlp, dims)
