"""DeltaNet and Gated DeltaNet: the linear special cases of the family (Schlag et al. 2021; Yang et
al. 2024, arXiv 2406.06484 and 2412.06464).

Per head a matrix memory S ∈ R^{d_k×d_v} (read as q S) takes, for every token, one gradient step
with learning rate β_t on ℓ_t(S) = ½‖k_t S − v_t‖² after a retention step S ← α_t S:

    S_t = α_t S_{t−1} − β_t k_tᵀ (k_t α_t S_{t−1} − v_t)          o_t = q_t S_t
        = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t

(DeltaNet: α ≡ 1; Gated DeltaNet: α_t = exp(−exp(A)·softplus(x_t w_a + b_dt)), Mamba2-style.)
The update is exact per token, so chunks are only a computation device: within a chunk of C
tokens with γ_t = Π_{s≤t} α_s (from the chunk start) and Γ_tj = γ_t/γ_j, the pseudo-values
u_t = β_t (v_t − γ_t k_t S₀ − Σ_{j<t} Γ_tj (k_t·k_j) u_j) solve one unit-lower-triangular system
(the WY / UT transform):

    (I + L) [U′ | W] = [diag(β) V | diag(βγ) K],   L_tj = β_t Γ_tj k_t·k_j  (j < t)
    U = U′ − W S₀,   O = diag(γ) Q S₀ + (Q Kᵀ ⊙ Γ)_{j≤t} U,   S_C = γ_C S₀ + (K ⊙ Γ_C·)ᵀ U

Around it (fla's layer): q, k, v projections, short causal depthwise convs + SiLU, L2-normalised
q and k, q scaled by d_k^{-1/2}, β_t = σ(x_t w_β), a per-head RMSNorm on the output (gated by
SiLU(x W_g) for Gated DeltaNet), the output projection. Only torch is imported (HF folders).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm
from ..common.parts import InnerKnobs, copy_param, l2_normalize
from ..common.reference import memory_scan_reference
from ..common.state import LayerState, Mixer
from ..ops.delta_rule.chunk import delta_rule_chunked, delta_rule_prepare, delta_rule_summary
from ..ops.delta_rule.knobs import delta_knob_inputs, delta_read_last
from ..ops.delta_rule.naive import delta_rule_recipe, delta_rule_reference


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def init_mamba2_decay(A_log: nn.Parameter, dt_bias: nn.Parameter, init=None) -> None:
    """Mamba2's decay initialisation, log α = −exp(A_log)·softplus(· + dt_bias): A ~ U(1, 16) per
    entry of A_log, dt ~ logU(1e-3, 0.1) per entry of dt_bias, stored through the inverse softplus."""
    with torch.no_grad():
        A = torch.empty(A_log.shape).uniform_(1, 16)
        dt = torch.exp(torch.rand(dt_bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    copy_param(A_log, torch.log(A), init)
    copy_param(dt_bias, _inv_softplus(dt.clamp_min(1e-4)), init)


class MatrixMemoryMixer(Mixer):
    """What the delta-rule layers (DeltaNet / Gated DeltaNet, KDA) share: a d×d matrix memory S per
    head, zero at the start, and q, k, v = ShortConv(W x) with their conv tails as the halo."""

    def init_state(self, batch_size: int) -> LayerState:
        S = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=self.q_proj.weight.device)
        return LayerState(weights={"S": S})

    def _heads(self, t):
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def conv_qkv(self, x: torch.Tensor, state: LayerState) -> tuple:
        """(q, k, v) [B, T, C] after the projections and short causal convs, and the new conv tails."""
        conv = {}
        q, conv["q"] = self.conv_q(self.q_proj(x), state.conv.get("q"))
        k, conv["k"] = self.conv_k(self.k_proj(x), state.conv.get("k"))
        v, conv["v"] = self.conv_v(self.v_proj(x), state.conv.get("v"))
        return q, k, v, conv


class DeltaNetLayer(MatrixMemoryMixer):
    """DeltaNet (``gated=False``) or Gated DeltaNet (``gated=True``) sequence mixer."""

    def __init__(self, hidden_size: int, num_heads: int, gated: bool = True, chunk_size: int = 64,
                 conv_kernel: int = 4, norm_eps: float = 1e-6, scan_impl: str = "chunk",
                 knobs: InnerKnobs | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        if scan_impl not in ("chunk", "reference"):
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected 'chunk' or 'reference'")
        self.hidden_size, self.num_heads, self.gated = hidden_size, num_heads, gated
        self.head_dim = hidden_size // num_heads
        self.chunk_size, self.scan_impl = chunk_size, scan_impl
        if knobs is not None and knobs.loss == "mse":  # the delta rule's own loss
            knobs = InnerKnobs(knobs.steps, knobs.grad_clip, knobs.init_pull, knobs.lr_decay, None)
        if knobs is not None and (knobs.grad_clip is not None or knobs.loss not in (None, "next_token")
                                  or not 0 <= knobs.init_pull < 1 or knobs.steps < 1):
            raise ValueError(f"(Gated) DeltaNet supports inner_steps, inner_init_pull in [0, 1), inner_lr_schedule "
                             f"and inner_loss mse/next_token, got {knobs}")
        self.knobs = None if knobs == InnerKnobs() else knobs  # None: exactly the plain code path
        K = 1 if knobs is None else knobs.steps  # DeltaProduct: K (k, v, β) per token
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, K * hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, K * hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(K * hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(K * hidden_size, conv_kernel)
        self.b_proj = nn.Linear(hidden_size, K * num_heads, bias=False)
        if gated:
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.zeros(num_heads))
            self.dt_bias = nn.Parameter(torch.zeros(num_heads))
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_norm = HeadRMSNorm(self.head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Mamba2's gate initialisation: A ~ U(1, 16), dt ~ logU(1e-3, 0.1) (through softplus)."""
        if self.gated:
            init_mamba2_decay(self.A_log, self.dt_bias, init)

    def prepare(self, x: torch.Tensor, state: LayerState):
        """Everything before the scan (models/common/state.py): q, k, v [B, H, T, d], β, log α [B, H, T]
        (None for DeltaNet) in the compute dtype (≥ float32), and the halo {"conv": new conv tails}."""
        q, k, v, conv = self.conv_qkv(x, state)
        if self.knobs is not None:  # sub-step dims: k, v [B, H, T, K, d], β [B, H, T, K]
            K = self.knobs.steps
            q = self._heads(F.silu(q))
            k, v = (F.silu(t).unflatten(-1, (K, self.num_heads, self.head_dim)).permute(0, 3, 1, 2, 4) for t in (k, v))
            compute = torch.promote_types(x.dtype, torch.float32)
            q = l2_normalize(q.to(compute)) * self.head_dim**-0.5
            k, v = l2_normalize(k.to(compute)), v.to(compute)
            beta = torch.sigmoid(self.b_proj(x)).unflatten(-1, (K, self.num_heads)).permute(0, 3, 1, 2).to(compute)
            log_alpha = None
            if self.gated:
                log_alpha = (-self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2).to(compute)
            return q, k, v, beta, log_alpha, {"conv": conv}
        q, k, v = (self._heads(F.silu(t)) for t in (q, k, v))
        compute = torch.promote_types(x.dtype, torch.float32)
        q = l2_normalize(q.to(compute)) * self.head_dim**-0.5
        k, v = l2_normalize(k.to(compute)), v.to(compute)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2).to(compute)  # [B, H, T]
        log_alpha = None
        if self.gated:
            log_alpha = (-self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2).to(compute)
        return q, k, v, beta, log_alpha, {"conv": conv}

    def run(self, q, k, v, beta, log_alpha, S):
        """The delta rule from S [B, H, dk, dv]; returns (o [B, H, T, d], S)."""
        if self.knobs is not None:
            raise ValueError("the inner-loop knobs (inner_steps, inner_init_pull, inner_lr_schedule, inner_loss) of "
                             "DeltaNet run through forward only (not the prefix mode's run)")
        if self.scan_impl == "chunk":
            return delta_rule_chunked(q, k, v, beta, log_alpha, S, self.chunk_size)
        return delta_rule_reference(q, k, v, beta, log_alpha, S)

    def _scan_knobs(self, q, k, v, beta, log_alpha, S, position: int, prev_key):
        """The delta rule with the inner-loop knobs (k, v, β with a sub-step dim); returns (o, S, last key)."""
        if self.scan_impl == "chunk":
            inputs, last_key = delta_knob_inputs(q, k, v, beta, log_alpha, self.knobs, position, prev_key)
            o, S = delta_rule_chunked(*inputs, S, self.chunk_size)
            return delta_read_last(o, self.knobs.steps), S, last_key
        alpha = torch.ones_like(beta[..., 0]) if log_alpha is None else log_alpha.exp()
        o, weights, _, _, last_key = memory_scan_reference(
            delta_rule_recipe(), {"S": S}, None, {}, q, k, v, {"alpha": alpha, "beta": beta}, {}, position,
            self.knobs, {"S": torch.zeros_like(S)}, prev_key)
        return o, weights["S"], (last_key if self.knobs.next_token else None)

    def summary(self, q, k, v, beta, log_alpha):
        """(A, B) of a piece from its own tokens (chunk form): S_out = A S_in + B."""
        return delta_rule_summary(delta_rule_prepare(q, k, v, beta, log_alpha, self.chunk_size))

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, [SiLU gate], output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2)  # [B, T, H, d]
        if self.gated:
            o = o * F.silu(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))

    def scan(self, inputs: tuple, state: LayerState):
        """The delta rule from ``state``: (o [B, H, T, d], {S}, conv tails, position)."""
        q, k, v, beta, log_alpha, halo = inputs
        position = state.position + q.shape[2]
        if self.knobs is not None:
            o, S, last_key = self._scan_knobs(q, k, v, beta, log_alpha, state.weights["S"].to(q.dtype), state.position,
                                              state.extra.get("prev_key"))
            extra = {} if last_key is None else {"prev_key": last_key}
            return o, LayerState(weights={"S": S}, conv=halo["conv"], extra=extra, position=position)
        o, S = self.run(q, k, v, beta, log_alpha, state.weights["S"].to(q.dtype))
        return o, LayerState(weights={"S": S}, conv=halo["conv"], position=position)
