"""flash-linear-attention's (fla) ops at the size of this project's mixers, for ``bench.layer --impls fla``.

fla is a benchmark-only install (``pip install -e .[bench]``), never a dependency. Each mixer here is
fla's op between plain projections: x → q, k, v (+ the op's per-token scalars) → op → o_proj, heads of
``hidden / heads``. It times fla's kernel with the same projection cost as ours, not fla's whole layer
(fla.layers' DeltaNet/GatedDeltaNet add short convolutions and a gated RMSNorm whose kernels are
Triton-only; ours add their own convolutions and norms, so ours do slightly more work per token).

    layer            CUDA (fla's kernels)                      CPU (fla's reference of the same op)
    deltanet         ops.delta_rule.chunk_delta_rule           delta_rule.naive.delta_rule_chunkwise
    gated_deltanet   ops.gated_delta_rule.chunk_gated_delta_rule  naive_chunk_gated_delta_rule
    ttt_linear       ops.ttt.chunk_ttt_linear                   ttt.naive.chunk_ttt_linear_ref
    titans           ops.titans.chunk_titans_linear_ref (fla has no kernel: PyTorch on both)

Documented differences from this project's layers: DeltaNet/GDN use fla's in-kernel L2 norm of q, k
and sigmoid β (GDN: log-space decay g = −softplus); fla's chunk kernels take bf16/fp16 only (fp32 asserts
on CUDA). fla's TTT-Linear is the op of ttt-lm-pytorch with a scalar per-token η (no learned
token-position scale). fla's Titans is a linear (matrix) memory with momentum and decay, not the
depth-2 MLP memory of ``titans``. On CPU fla's Triton kernels cannot run (under TRITON_INTERPRET=1
their autotuner needs a GPU driver, and with one config the interpreter fails inside a kernel), so the
CPU path, used by the tests, runs fla's reference of the same op through the same module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LAYERS = ("deltanet", "gated_deltanet", "ttt_linear", "titans")
CHUNK = {"deltanet": 64, "gated_deltanet": 64, "ttt_linear": 16, "titans": 64}
SCALARS = {"deltanet": 1, "gated_deltanet": 2, "ttt_linear": 1, "titans": 3}  # per-token, per-head inputs


def op(layer: str, kernel: bool):
    """fla's function for ``layer`` as f(q, k, v, s, w, b) → o, all [B, T, H, ·] (s: [B, T, H, n] scalars,
    w, b: the TTT/Titans LayerNorm [H·d]); ``kernel``: fla's Triton kernel, else its PyTorch reference."""
    if layer == "deltanet":
        if kernel:
            from fla.ops.delta_rule import chunk_delta_rule
            return lambda q, k, v, s, w, b: chunk_delta_rule(q, k, v, s[..., 0].sigmoid(),
                                                             use_qk_l2norm_in_kernel=True)[0]
        from fla.ops.delta_rule.naive import delta_rule_chunkwise

        def ref(q, k, v, s, w, b):
            q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
            beta = s[..., 0].sigmoid().transpose(1, 2).float()
            o = delta_rule_chunkwise(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta, CHUNK[layer])[0]
            return o.transpose(1, 2).to(v.dtype)
        return ref
    if layer == "gated_deltanet":
        if kernel:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            return lambda q, k, v, s, w, b: chunk_gated_delta_rule(
                q, k, v, -F.softplus(s[..., 0].float()), s[..., 1].sigmoid(), use_qk_l2norm_in_kernel=True)[0]
        from fla.ops.gated_delta_rule import naive_chunk_gated_delta_rule
        return lambda q, k, v, s, w, b: naive_chunk_gated_delta_rule(
            F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, -F.softplus(s[..., 0].float()), s[..., 1].sigmoid(),
            chunk_size=CHUNK[layer])[0].to(v.dtype)
    if layer == "ttt_linear":
        if kernel:
            from fla.ops.ttt import chunk_ttt_linear
            return lambda q, k, v, s, w, b: chunk_ttt_linear(q, k, v, w, b, s.sigmoid() / q.shape[-1],
                                                             chunk_size=CHUNK[layer])[0]
        from fla.ops.ttt.naive import chunk_ttt_linear_ref
        # the reference scales q in place: a fresh tensor, not a view of the projection
        return lambda q, k, v, s, w, b: chunk_ttt_linear_ref(q.clone(), k, v, w, b, s.sigmoid() / q.shape[-1],
                                                             mini_batch_size=CHUNK[layer])[0].to(v.dtype)
    if layer == "titans":  # no Triton kernel in fla: its chunked PyTorch form on every device
        from fla.ops.titans.naive import chunk_titans_linear_ref
        return lambda q, k, v, s, w, b: chunk_titans_linear_ref(
            q, k, v, w, b, s[..., :1].sigmoid(), s[..., 1:2].sigmoid(), s[..., 2:3].sigmoid() * 0.1,
            chunk_size=CHUNK[layer])[0].to(v.dtype)
    raise ValueError(f"fla has no op for {layer!r} here (fla compares with: {', '.join(LAYERS)})")


class FlaMixer(torch.nn.Module):
    """x [B, T, C] → o_proj(fla_op(q, k, v, scalars)) at ``heads`` heads of C / heads."""

    def __init__(self, layer: str, hidden: int, heads: int, kernel: bool):
        super().__init__()
        self.layer, self.heads, self.d = layer, heads, hidden // heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.scalars = torch.nn.Linear(hidden, SCALARS[layer] * heads, bias=False)
        self.norm_w = torch.nn.Parameter(torch.ones(hidden))
        self.norm_b = torch.nn.Parameter(torch.zeros(hidden))
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.op = op(layer, kernel)

    def forward(self, x):
        B, T, _ = x.shape
        if T % CHUNK[self.layer]:
            raise ValueError(f"fla {self.layer}: sequence length {T} is not a multiple of its chunk {CHUNK[self.layer]}")
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.d).unbind(2)
        s = self.scalars(x).view(B, T, self.heads, -1)
        o = self.op(q, k, v, s, self.norm_w, self.norm_b)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


def build(layer: str, hidden: int, heads: int, device: torch.device) -> FlaMixer:
    """fla's kernels on CUDA, their PyTorch references elsewhere (see the module docstring)."""
    return FlaMixer(layer, hidden, heads, kernel=device.type == "cuda")
