"""Kimi Delta Attention (KDA; Kimi Team, "Kimi Linear", arXiv 2510.26692): Gated DeltaNet whose
scalar decay becomes a channel-wise one, α_t ∈ (0, 1)^{d_k}. Per head a matrix memory S ∈ R^{d_k×d_v}:

    S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ          o_t = S_tᵀ q_t

with log α_t = −exp(A_h) · softplus(x_t W_f + b_dt) (A per head, b_dt per channel) and β_t = σ(x_t w_β).
Chunked (WY) form over chunks of C tokens, with G_t = Σ_{s≤t} log α_s per channel (from the chunk
start), γ_t = exp(G_t) and the pseudo-values u_t (S_t = Diag(γ_t) S₀ + Σ_{j≤t} Diag(γ_t/γ_j) k_j u_jᵀ):

    (I + L) [U′ | W] = [diag(β) V | diag(β) (K ⊙ γ)],   L_tj = β_t Σ_c k_tc k_jc e^{G_tc − G_jc}  (j < t)
    U = U′ − W S₀
    o_t = S₀ᵀ (γ_t ⊙ q_t) + Σ_{j≤t} (Σ_c q_tc k_jc e^{G_tc − G_jc}) u_j
    S_C = Diag(γ_C) S₀ + Σ_j (k_j ⊙ γ_C/γ_j) u_jᵀ

Every decay factor is a product over a span inside one chunk (exponent ≤ 0): no division by γ.
The layer around it follows flash-linear-attention's ``KimiDeltaAttention``: q, k, v projections,
short causal convs + SiLU, L2-normalised q and k, q scaled by d_k^{-1/2}, a per-head RMSNorm of the
output gated by σ(x W_g), the output projection; here the decay and gate projections are full rank
(fla's are low rank). Only torch is imported (HF folders).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm
from ..common.parts import l2_normalize
from ..common.state import LayerState
from ..ops.kda.chunk import kda_chunked
from ..ops.kda.naive import kda_reference
from .deltanet import MatrixMemoryMixer, init_mamba2_decay


class KDALayer(MatrixMemoryMixer):
    """Kimi Delta Attention sequence mixer: ``forward(x, state) -> (y, state)`` = prepare → scan → output
    (the contract of models/common/state.py)."""

    def __init__(self, hidden_size: int, num_heads: int, chunk_size: int = 32, conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        if scan_impl not in ("chunk", "reference"):
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected 'chunk' or 'reference'")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.chunk_size, self.scan_impl = chunk_size, scan_impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.f_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # the channel-wise decay
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(hidden_size))
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_norm = HeadRMSNorm(self.head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Mamba2's gate initialisation: A ~ U(1, 16) per head, dt ~ logU(1e-3, 0.1) per channel."""
        init_mamba2_decay(self.A_log, self.dt_bias, init)

    def prepare(self, x: torch.Tensor, state: LayerState):
        """q, k, v, β [B, H, T], log α [B, H, T, d] in the compute dtype (≥ float32), and the halo
        {"conv": the new conv tails}."""
        q, k, v, conv = self.conv_qkv(x, state)
        compute = torch.promote_types(x.dtype, torch.float32)
        q, k, v = (self._heads(F.silu(t)).to(compute) for t in (q, k, v))
        q, k = l2_normalize(q) * self.head_dim**-0.5, l2_normalize(k)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2).to(compute)
        rate = F.softplus((self.f_proj(x) + self.dt_bias).to(compute))
        log_alpha = -self.A_log.exp().to(compute)[:, None, None] * self._heads(rate)
        return q, k, v, beta, log_alpha, {"conv": conv}

    def scan(self, inputs: tuple, state: LayerState):
        """The delta rule with channel-wise decay from ``state``: (o [B, H, T, d], the state after)."""
        q, k, v, beta, log_alpha, halo = inputs
        S = state.weights["S"].to(q.dtype)
        if self.scan_impl == "chunk":
            o, S = kda_chunked(q, k, v, beta, log_alpha, S, self.chunk_size)
        else:
            o, S = kda_reference(q, k, v, beta, log_alpha, S)
        return o, LayerState(weights={"S": S}, conv=halo["conv"], position=state.position + q.shape[2])

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, σ gate, output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2)  # [B, T, H, d]
        o = o * torch.sigmoid(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))


def build_kda_mixer(config, layer_idx: int) -> KDALayer:
    return KDALayer(config.hidden_size, config.num_attention_heads, chunk_size=config.kda_chunk_size,
                    conv_kernel=config.conv_kernel, norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl)


def kda_flops(config, seq_len: int) -> float:
    """Per head: q·S, W·S and the state update 6·d²; the intra-chunk K Kᵀ and Q Kᵀ with their
    channel-wise decays 6·c·d and A(U′ − W S) 2·c·d, chunk c."""
    H = config.num_attention_heads
    d = config.hidden_size // H
    c = min(config.kda_chunk_size, seq_len)
    return H * (6 * d * d + 8 * c * d)
