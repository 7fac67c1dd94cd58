"""ATLAS, "Learning to Optimally Memorize the Context at Test Time" (Behrouz et al. 2025, arXiv 2505.23735):
a deep memory trained by the Omega rule on polynomial features of the keys, with Muon.

Per head: keys/queries pass through a polynomial feature map φ of degree p (all monomials of degree
1..p, scaled so that ⟨φ(x), φ(y)⟩ = Σ_i a_i² (x·y)^i, a_i learnable, initialised to √(1/i!): the
Taylor terms of exp(x·y)); the memory M(x) = GELU(x W1) W2 maps φ(k) → v. The Omega rule trains M at
step t on the last c tokens at once, each weighted by an input-dependent gate γ_i ∈ (0, 1):

    ω_t = ∇_M Σ_{i=t−c+1..t} γ_i ½‖M(φ(k_i)) − v_i‖²
    S_t = θ_t S_{t−1} + ω_t                       (momentum; ``sgd``: S_t = ω_t, OmegaNet)
    M_t = α_t M_{t−1} − η_t NS₅(S_t)              (``muon``: Newton–Schulz orthogonalisation, as LaCT's;
                                                   ``momentum``: S_t itself)
    y_t = M_t(φ(q_t))

η_t = base_lr·σ(·), θ_t = σ(·), α_t = σ(·), γ_t = σ(·) per head and token (linear in x_t).
Chunk rule (frozen gradients, as Titans): every ω_t of a chunk of b tokens is taken at the chunk's
first memory M_{t'} (the window may reach into earlier chunks: those tokens' gradients are also
taken at M_{t'}). Then S_t is linear in (S_{t'}, u_j = X_jᵀΔ_j):  S_t = P_t S_{t'} + Σ_j K_tj u_j with
K = (momentum decays) · (band of width c); Muon is applied to every S_t of the chunk at once and
M_t = A_t M_{t'} − Σ_j C_tj NS(S_j); S_t and M_t are materialised per token (NS is not linear).
Without Muon, M_t = A_t M_{t'} + (C P)_t S_{t'} + Σ_j (C K)_tj u_j is read in the dual form.
The state carries M, S, the chunk's anchor when mid-chunk, and the last c − 1 tokens' (φ(k), v, γ)
(``cache``), so one call equals any split. Only torch is imported: copied into HF folders.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from ..common.parts import copy_param
from ..common.state import LayerState, Mixer
from ..ops.atlas.chunk import NAMES, OPTIMIZERS, atlas_scan_chunked, poly_feature_dim, poly_features
from ..ops.atlas.naive import atlas_scan_reference


ATLAS_SCANS = {"chunk": atlas_scan_chunked, "reference": atlas_scan_reference}


# ------------------------------------------------------------------------------ the layer


class AtlasLayer(Mixer):
    """ATLAS as a sequence mixer: q/k/v projections → causal conv → SiLU → L2-normalised q, k →
    polynomial features → the Omega-rule memory → per-head RMSNorm ⊙ σ(gate) → output projection."""

    fast_weight_names = ("W1", "W2")  # θ₀, the initial memory (no weight decay in pretrain.optim)

    def __init__(self, hidden_size: int, num_heads: int, chunk_size: int = 16, window: int = 8, poly_degree: int = 2,
                 expansion: int = 2, base_lr: float = 0.1, optimizer: str = "muon", conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner_optimizer {optimizer!r} for atlas; expected one of {OPTIMIZERS}")
        if scan_impl not in ATLAS_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(ATLAS_SCANS)}")
        if min(chunk_size, window, poly_degree, expansion) < 1:
            raise ValueError("chunk_size, window, poly_degree and expansion must be ≥ 1")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.feature_dim = D = poly_feature_dim(d, poly_degree)
        self.chunk_size, self.window, self.base_lr = chunk_size, window, base_lr
        self.optimizer, self.scan_impl = optimizer, scan_impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.gates = nn.Linear(hidden_size, 4 * num_heads, bias=True)  # [η | θ | α | γ] × heads
        self.poly_coef = nn.Parameter(torch.zeros(num_heads, poly_degree))
        self.W1 = nn.Parameter(torch.zeros(num_heads, D, expansion * d))
        self.W2 = nn.Parameter(torch.zeros(num_heads, expansion * d, d))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Memory ~ N(0, 1/d_in); a_i = √(1/i!); gate biases: η ≈ base_lr/2, θ ≈ 0.9, α ≈ 0.98, γ ≈ 0.73."""
        init = init or nn.init
        for n in NAMES:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        H, degree = self.num_heads, self.poly_coef.shape[-1]
        coef = torch.tensor([math.sqrt(1 / math.factorial(i)) for i in range(1, degree + 1)]).expand(H, degree)
        bias = torch.cat([torch.zeros(H), torch.full((H,), 2.2), torch.full((H,), 4.0), torch.full((H,), 1.0)])
        copy_param(self.poly_coef, coef, init)
        copy_param(self.gates.bias, bias, init)

    def init_state(self, batch_size: int) -> LayerState:
        dtype = torch.promote_types(self.W1.dtype, torch.float32)
        w = {n: getattr(self, n).to(dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape) for n in NAMES}
        opt = {} if self.optimizer == "sgd" else {"momentum": {n: torch.zeros_like(t) for n, t in w.items()}}
        cache = {}
        if self.window > 1:
            H, c = self.num_heads, self.window - 1
            z = self.W1.new_zeros((), dtype=dtype)
            cache = {"k": z.expand(batch_size, H, c, self.feature_dim), "v": z.expand(batch_size, H, c, self.head_dim),
                     "gamma": z.expand(batch_size, H, c)}
        return LayerState(weights=w, opt=opt, cache=cache)

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, polynomial features of L2-normalised q/k, gates:
        (q, k, v, gates, halo {"conv"})."""
        q, k, v, g, halo = memory_prologue(self, x, state.conv)
        coef = self.poly_coef.to(q.dtype)
        q, k = poly_features(q, coef), poly_features(k, coef)
        g = torch.sigmoid(g).unflatten(1, (4, self.num_heads))  # [B, 4, H, T]
        gates = {"lr": self.base_lr * g[:, 0], "theta": g[:, 1], "alpha": g[:, 2], "gamma": g[:, 3]}
        return q, k, v, gates, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The memory from ``state`` (the Omega window of earlier keys travels in ``cache``): (o, state)."""
        q, k, v, gates, halo = inputs
        compute = q.dtype
        cast = (lambda d: None if not d else {n: t.to(compute) for n, t in d.items()})
        o, weights, anchor, mom, window = ATLAS_SCANS[self.scan_impl](
            cast(state.weights), cast(state.anchor), cast(state.opt.get("momentum")), cast(state.cache), q, k, v, gates,
            state.position, self.chunk_size, self.window, self.optimizer)
        return o, LayerState(weights=weights, anchor=anchor, opt={} if mom is None else {"momentum": mom},
                             cache=window or {}, position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm ⊙ σ(gate), output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2) * torch.sigmoid(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))


# the default upper bound of η per inner optimizer: Muon's orthogonalised step has unit scale; the raw
# momentum / SGD step sums the gradient over the features and the Omega window (issue 22, at ``tiny``:
# 0.1 is NaN at initialisation, 0.01 has a step-1 gradient norm of 52, 0.001 trains 31 steps and
# diverges, 1e-4 trains 150 steps ahead of attention)
DEFAULT_BASE_LR = {"muon": 0.1, "momentum": 1e-4, "sgd": 1e-4}


def build_atlas_mixer(config) -> AtlasLayer:
    """``atlas`` from a MemoryLMConfig."""
    optimizer = config.inner_optimizer or "muon"
    base_lr = config.atlas_base_lr if config.atlas_base_lr is not None else DEFAULT_BASE_LR.get(optimizer, 0.1)
    return AtlasLayer(config.hidden_size, config.num_attention_heads, chunk_size=config.atlas_chunk_size,
                      window=config.atlas_window, poly_degree=config.atlas_poly_degree,
                      expansion=config.atlas_memory_expansion, base_lr=base_lr,
                      optimizer=optimizer, conv_kernel=config.conv_kernel,
                      norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl)
