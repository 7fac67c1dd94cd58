"""Small building blocks shared by every model: norms, the SwiGLU MLP, RoPE and a causal conv.

Only torch is imported here: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parts import l2_normalize


try:  # optional CUDA kernel; the pure-PyTorch path below is the reference
    from causal_conv1d import causal_conv1d_fn
except ImportError:  # pragma: no cover - CUDA-only extra
    causal_conv1d_fn = None


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadRMSNorm(RMSNorm):
    """RMSNorm computed in at least float32 (float64 stays float64): per-head output norms, gates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        if act not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"unsupported hidden_act {act!r}; expected silu, gelu or gelu_tanh")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.act == "silu":
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.down_proj(gate * self.up_proj(x))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [T, head_dim/2] for integer positions, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x_2i, x_2i+1) by angle pos·θ^(-2i/d) (the GPT-J / JAX-TTT layout).

    x: [..., T, d]; cos, sin: [T, d/2]. In float32/float64 a pair is one complex number and the
    rotation one complex product, (x_2i + i x_2i+1)(cos + i sin): two passes over x instead of seven
    (and as few in backward); other dtypes (no complex bf16) take the real form.
    """
    as_complex = x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])
    if x.dtype in (torch.float32, torch.float64) and cos.dtype == x.dtype and as_complex:
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_odd * cos + x_even * sin
    return torch.stack((rot_even, rot_odd), dim=-1).flatten(-2)


def apply_rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x_i, x_{i+d/2}) by angle pos·θ^(-2i/d) (the Llama / NeoX layout).

    x: [..., T, d]; cos, sin: [T, d/2].
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution y_t = b + Σ_{i<K} w_i x_{t-K+1+i} with a carried tail.

    The tail (the last K-1 inputs, zeros at the start of a sequence) is the layer's state, so
    a sequence cut into pieces gives the same output as one call.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.Conv1d's default initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        bound = 1.0 / self.kernel_size**0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None, activation: str | None = None):
        """x: [B, T, C], tail: [B, C, K-1] or None → (y [B, T, C], new tail); ``activation="silu"``
        returns SiLU(y) (one fused op, as the CUDA kernel's ``activation``)."""
        if activation not in (None, "silu"):
            raise ValueError(f"unsupported activation {activation!r}; expected None or 'silu'")
        n = self.kernel_size - 1
        if tail is None and causal_conv1d_fn is not None and x.is_cuda:
            xt = x.transpose(1, 2)
            y = causal_conv1d_fn(xt.contiguous(), self.weight.squeeze(1), self.bias, activation=activation)
            return y.transpose(1, 2), _new_tail(x, None, n)
        prev = None if tail is None else tail.to(x.dtype).transpose(1, 2)
        y = _ShiftedCausalConv.apply(x, prev, self.weight, self.bias, activation == "silu")
        return y, _new_tail(x, tail, n)


class _ShiftedCausalConv(torch.autograd.Function):
    """y_t = b + Σ_{i<K} w_i ⊙ u_{t+i}, u = [tail; x] ([B, K−1+T, C]), then SiLU if ``silu``: K shifted
    multiply-adds in the [B, T, C] layout (F.conv1d wants [B, C, T]; see :func:`causal_conv1d_reference`).
    Computed in at least float32 and returned in x's dtype (as autocast's conv would); the backward
    takes its gradient contiguous first (it often arrives as a per-head [B, H, T, d] layout)."""

    @staticmethod
    def forward(ctx, x, prev, weight, bias, silu: bool):
        compute = torch.promote_types(x.dtype, torch.float32)
        K, T = weight.shape[-1], x.shape[1]
        w = weight.to(compute)[:, 0].t()  # [K, C]
        y = torch.addcmul(bias.to(compute), x, w[K - 1])
        for i in range(K - 1):
            s = K - 1 - i  # tap i reads u_{t+i} = x_{t−s} (t ≥ s), tail_{t+i} (t < s)
            if T > s:
                y[:, s:].addcmul_(x[:, :T - s], w[i])
            if prev is not None:
                y[:, :min(s, T)].addcmul_(prev[:, i:i + min(s, T)], w[i])
        y = y.to(x.dtype)
        ctx.save_for_backward(x, prev, weight, y)
        ctx.silu = silu
        return F.silu(y) if silu else y

    @staticmethod
    def backward(ctx, g):
        x, prev, weight, y = ctx.saved_tensors
        g = g.contiguous()
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, y)
        compute = torch.promote_types(x.dtype, torch.float32)
        g = g.to(compute)
        K, T = weight.shape[-1], x.shape[1]
        w = weight.to(compute)[:, 0].t()
        g_x = g * w[K - 1]
        g_w = [(g * x).sum((0, 1))] * K
        g_prev = None if prev is None else torch.zeros_like(prev, dtype=compute)
        for i in range(K - 1):
            s = K - 1 - i
            acc = torch.zeros_like(g_w[-1])
            if T > s:
                g_x[:, :T - s].addcmul_(g[:, s:], w[i])
                acc += (g[:, s:] * x[:, :T - s]).sum((0, 1))
            if prev is not None:
                m = min(s, T)
                g_prev[:, i:i + m].addcmul_(g[:, :m], w[i])
                acc += (g[:, :m] * prev[:, i:i + m]).sum((0, 1))
            g_w[i] = acc
        g_w = torch.stack(g_w, -1).unsqueeze(1).to(weight.dtype)
        return (g_x.to(x.dtype), None if prev is None else g_prev.to(prev.dtype), g_w, g.sum((0, 1)).to(weight.dtype),
                None)


def causal_conv1d_reference(x: torch.Tensor, tail: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor):
    """:class:`CausalConv1d` as a grouped F.conv1d over [tail; x] in the [B, C, T] layout (the reference)."""
    xt = x.transpose(1, 2)
    if tail is None:
        tail = xt.new_zeros(xt.shape[0], xt.shape[1], weight.shape[-1] - 1)
    full = torch.cat([tail.to(xt.dtype), xt], dim=-1)
    return F.conv1d(full, weight, bias, groups=full.shape[1]).transpose(1, 2)


def _new_tail(x: torch.Tensor, tail: torch.Tensor | None, n: int) -> torch.Tensor:
    """The last n inputs of [tail; x] as [B, C, n] (zeros before the sequence start when tail is None)."""
    xt = x.transpose(1, 2)
    if xt.shape[-1] >= n:
        return xt[..., xt.shape[-1] - n:]
    prev = xt.new_zeros(xt.shape[0], xt.shape[1], n) if tail is None else tail.to(xt.dtype)
    return torch.cat([prev, xt], -1)[..., -n:]


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H·d] → [B, H, T, d]."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)


def memory_prologue(layer: nn.Module, x: torch.Tensor, conv_state: dict):
    """The prologue shared by the Titans-style mixers (Titans, Miras, ATLAS, TNT), per head:

        q = L2(SiLU(conv(x W_q))),  k = L2(SiLU(conv(x W_k))),  v = SiLU(conv(x W_v)),  g = x W_g + b

    ``layer`` holds ``q_proj/k_proj/v_proj``, ``conv_q/conv_k/conv_v`` (:class:`CausalConv1d`),
    ``gates`` (the gate logits, G per head) and ``num_heads``. Returns q, k, v [B, H, T, d] and
    g [B, G·H, T] in the compute dtype (≥ float32), and the halo {"conv": the new conv tails}.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    out, tails = [], {}
    for name in ("q", "k", "v"):
        y, tails[name] = getattr(layer, f"conv_{name}")(getattr(layer, f"{name}_proj")(x), conv_state.get(name),
                                                        activation="silu")
        out.append(split_heads(y, layer.num_heads).to(compute))
    q, k, v = out
    g = layer.gates(x).to(compute).transpose(1, 2)
    return l2_normalize(q), l2_normalize(k), v, g, {"conv": tails}


__all__ = [
    "RMSNorm",
    "HeadRMSNorm",
    "SwiGLUMLP",
    "CausalConv1d",
    "causal_conv1d_reference",
    "rope_cos_sin",
    "apply_interleaved_rope",
    "apply_rotate_half_rope",
    "split_heads",
    "memory_prologue",
]
