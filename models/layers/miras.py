"""Miras, "It's All Connected" (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173): three
memory layers built from the shared parts (inner model, attentional bias, retention, optimizer).

Per head the memory is the Miras MLP with a residual and a per-head LayerNorm (§7.2 of the design
notes; GELU, hidden width E·d):

    M_W(x) = x + LN_{γ,β}(GELU(x W1) W2)                  y_t = M_{W_t}(q_t)  (read after the update)

and each variant trains it online on a different attentional bias ℓ and retention:

    Moneta  ℓ = (1/p) Σ_i (e_i² + ε)^{p/2}   (smooth ℓ_p, p = 3; e = M(k) − v)
            A_t = α_t A_{t−1} − η_t ∇ℓ,     W_t = A_t / ‖A_t‖_q^{q−2}    (ℓ_q retention, q = 4, per matrix)
    Yaad    ℓ = ½‖e‖² if ‖e‖ ≤ δ_t else δ_t ‖e‖₁   (Huber, data-dependent threshold δ_t)
            W_t = (1 − a_t) W_{t−1} − η_t ∇ℓ                              (Titans-style forget gate a_t)
    Memora  ℓ = ½‖e‖²,  W = c·softmax(L) over each column's inputs (W ≥ 0, columns sum to c = √d_in)
            L_t = α_t L_{t−1} − η_t ∇_W ℓ    i.e.  W_t = c·softmax(α_t log W_{t−1} − η_t ∇ℓ)   (KL retention)

Every ℓ is averaged over the d features (ℓ/d, as titans-pytorch's mean-squared error): summed, the
per-token gradient grows with the head width and a 64-wide head's first chunk already moved the
memory several times its own norm.

Chunk rule (frozen gradients, as Titans): for token t of a chunk of b tokens starting at t', every
∇ℓ is taken at the chunk's first weights W_{t'}. Inside a chunk the accumulators (W for Yaad, A
for Moneta, the logits L for Memora) then follow a linear recurrence in the per-token gradients
u_j = X_jᵀ Δ_j (layer input × back-propagated error at W_{t'}), with coefficients from the gates:

    S_t = P_t S_{t'} + Σ_{j≤t} C_tj u_j,     P_t = Π_{i≤t} α_i,   C_tj = −η_j Π_{j<i≤t} α_i

Yaad and Moneta read in the dual form (no per-token weights: z = P_t h S_{t'} + (C ⊙ h Xᵀ) Δ);
Memora materialises L_t per token (the softmax is not linear). Moneta's normaliser ‖A‖_q^{q−2}
is re-evaluated once per chunk, at its last token (the last token reads with the new one; the
others with the chunk start's): b = 1 is the online rule. A call may start or end inside a chunk:
the state carries the chunk's anchor W_{t'} beside the current weights (Moneta: and the
normaliser in ``opt["norm"]``, Memora: the logits L are the state's weights).
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from ..common.parts import copy_param
from ..common.state import LayerState, Mixer
from ..ops.miras.chunk import NAMES, VARIANTS, lq_normaliser, miras_scan_chunked
from ..ops.miras.naive import miras_scan_reference


MIRAS_SCANS = {"chunk": miras_scan_chunked, "reference": miras_scan_reference}


# ------------------------------------------------------------------------------ the layer


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class MirasLayer(Mixer):
    """Moneta, Yaad or Memora as a sequence mixer: q/k/v projections → causal conv → SiLU →
    L2-normalised q, k → the memory → per-head RMSNorm ⊙ σ(gate) → output projection.
    Per-token, per-head gates: η_t = base_lr·σ(·), retention α_t = σ(·) (Yaad: 1 − a_t, a_t = σ(·)),
    Yaad's δ_t = softplus(·)."""

    fast_weight_names = ("W1", "W2")  # θ₀, the initial memory (no weight decay in pretrain.optim)

    def __init__(self, hidden_size: int, num_heads: int, variant: str = "moneta", chunk_size: int = 16,
                 expansion: int = 4, base_lr: float = 0.1, p: float = 3.0, q: float = 4.0, conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Miras variant {variant!r}; expected one of {VARIANTS}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if scan_impl not in MIRAS_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(MIRAS_SCANS)}")
        if chunk_size < 1 or expansion < 1:
            raise ValueError("chunk_size and expansion must be ≥ 1")
        if p < 1 or q < 2:
            raise ValueError(f"Moneta needs p ≥ 1 and q ≥ 2, got p={p}, q={q}")
        self.variant, self.hidden_size, self.num_heads = variant, hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.chunk_size, self.base_lr, self.p, self.q, self.scan_impl = chunk_size, base_lr, p, q, scan_impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.num_gates = 3 if variant == "yaad" else 2
        self.gates = nn.Linear(hidden_size, self.num_gates * num_heads, bias=True)  # [η | retention | (δ)]
        self.W1 = nn.Parameter(torch.zeros(num_heads, d, expansion * d))
        self.W2 = nn.Parameter(torch.zeros(num_heads, expansion * d, d))
        self.ln_weight = nn.Parameter(torch.ones(num_heads, d))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, d))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Memory ~ N(0, 1/d_in) (Memora: logits ~ N(0, 1)); LN γ = 1, β = 0; gate biases: η ≈ base_lr/2,
        retention ≈ 0.999, δ ≈ √d (the typical ‖M(k) − v‖ at init: the LN output has unit RMS, so
        both branches of the Huber bias occur). The memory's output goes through a LayerNorm, so its
        step relative to ‖W‖ grows as 1/‖W‖²: a retention of 0.98 per token shrank W ~10⁴× over 512
        tokens and the steps exploded (step-1 gradient norm 10⁶ for Yaad at hidden 256)."""
        init = init or nn.init
        for n in NAMES:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=1.0 if self.variant == "memora" else p.shape[-2] ** -0.5)
        init.ones_(self.ln_weight)
        init.zeros_(self.ln_bias)
        H = self.num_heads
        parts = [torch.zeros(H), torch.full((H,), -7.0 if self.variant == "yaad" else 7.0)]
        if self.variant == "yaad":
            parts.append(torch.full((H,), _inv_softplus(self.head_dim ** 0.5)))
        copy_param(self.gates.bias, torch.cat(parts), init)

    def init_state(self, batch_size: int) -> LayerState:
        dtype = torch.promote_types(self.W1.dtype, torch.float32)
        a = {n: getattr(self, n).to(dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape) for n in NAMES}
        if self.variant != "moneta":
            return LayerState(weights=a)
        r = {n: lq_normaliser(t, self.q) for n, t in a.items()}  # the parameters are A₀; W₀ = r(A₀) A₀
        return LayerState(weights={n: a[n] * r[n] for n in NAMES}, opt={"norm": r})

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, L2-normalised q/k, gates (η, retention[, δ]) and the memory's
        LayerNorm over the batch: (q, k, v, gates, ln_w, ln_b, halo {"conv"})."""
        B = x.shape[0]
        q, k, v, g, halo = memory_prologue(self, x, state.conv)
        compute = q.dtype
        g = g.unflatten(1, (self.num_gates, self.num_heads))  # [B, G, H, T]
        gates = {"lr": self.base_lr * torch.sigmoid(g[:, 0]),
                 "keep": torch.sigmoid(-g[:, 1]) if self.variant == "yaad" else torch.sigmoid(g[:, 1])}
        if self.variant == "yaad":
            gates["delta"] = F.softplus(g[:, 2])
        ln_w = self.ln_weight.to(compute).expand(B, *self.ln_weight.shape)
        ln_b = self.ln_bias.to(compute).expand(B, *self.ln_bias.shape)
        return q, k, v, gates, ln_w, ln_b, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The memory from ``state``: (o [B, H, T, d], state)."""
        q, k, v, gates, ln_w, ln_b, halo = inputs
        compute = q.dtype
        cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
        opt = {"norm": cast(state.opt["norm"])} if self.variant == "moneta" else {}
        o, weights, anchor, opt = MIRAS_SCANS[self.scan_impl](
            self.variant, cast(state.weights), cast(state.anchor), opt, q, k, v, gates, ln_w, ln_b, state.position,
            self.chunk_size, self.p, self.q)
        return o, LayerState(weights=weights, anchor=anchor, opt=opt, position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm ⊙ σ(gate), output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2) * torch.sigmoid(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))


def build_miras_mixer(config, kind: str) -> MirasLayer:
    """``moneta``, ``yaad`` or ``memora`` from a MemoryLMConfig."""
    return MirasLayer(config.hidden_size, config.num_attention_heads, kind, chunk_size=config.miras_chunk_size,
                      expansion=config.miras_memory_expansion, base_lr=config.miras_base_lr, p=config.miras_p,
                      q=config.miras_q, conv_kernel=config.conv_kernel, norm_eps=config.rms_norm_eps,
                      scan_impl=config.scan_impl)
