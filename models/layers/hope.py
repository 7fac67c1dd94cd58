"""Hope: a self-modifying Titans memory followed by a Continuum Memory System (Behrouz, Razaviyayn,
Zhong, Mirrokni 2025, *Nested Learning: The Illusion of Deep Learning Architectures*, arXiv 2512.24695).

**Self-modifying memory.** Per head, five memories M_□, □ ∈ {key, value, lr, decay, memory}, each a
2-layer GELU MLP with learnable initial weights; key/value/memory are residual (M(x) = x + GELU(x W1) W2),
lr/decay map to one number (M(x) = GELU(x W1) W2). Only q and the memories' input u are static
projections (projection, causal conv, SiLU, L2 norm per head). For token t in a chunk of b tokens
starting at t' (``chunk_size``), everything the memories generate uses their weights at t':

    k_t = L2(M_key(u_t)),  v_t = M_value(u_t),  η_t = base_lr·σ(M_lr(u_t) + b_η),  α_t = σ(M_decay(u_t) + b_α)
    v̂_□,t = M_□(v_t)                                     (each memory generates its own target)
    M_□,t = α_t M_□,t−1 − η_t ∇ ½‖M_□(k_t) − v̂_□,t‖² |_{M_□,t'}      (all five, frozen gradients)
    o_t = M_memory,t(q_t)                                 (read after the update, as Titans)

For a linear memory and b = 1 the update is the paper's M(α I − η k kᵀ) + η v̂ kᵀ ("delta gradient
descent"); for the MLP memories it is gradient descent on the same L2 objective with retention α
— Titans' rule without momentum, so the chunked form reuses ``titans_scan_chunked`` (the read) and
the O(n) chunk-end coefficients of ``tnt.py`` (the other four memories need no per-token read).
Chunks are serial (the next chunk's keys come from the updated memories); inside a chunk all is
parallel. A call may end mid-chunk: the state keeps the chunk-start memories (``anchor``).

**Continuum Memory System.** A chain of levels ℓ = 1..L, level ℓ updated once every C_ℓ tokens
(``cms_chunk_sizes``). Level ℓ has per-head fast weights θ_ℓ (a GELU MLP d → e·d → d, learnable
initial weights) and maps its input h (the previous level's output; level 1 reads the memory's output):

    k_t = L2(h_t) per head,   v_t = h_t W_v,   η_t = base_lr·σ(h_t w_η + b_η)
    y_t = h_t + W_o RMSNorm_h(MLP_{θ_s}(k_t))                     θ_s: θ_ℓ at the start of t's span
    at a span end:  θ_ℓ ← θ_s − Σ_{t ∈ span} η_t ∇_θ ½‖MLP_θ(k_t) − v_t‖² |_{θ_s}

(read before the update: a span's own tokens reach θ_ℓ at its end). The state keeps θ_s and the
pending gradient sum of an unfinished span, so any split of a sequence gives the same result.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm
from ..common.parts import l2_normalize
from ..common.state import LayerState, Mixer
from ..ops.hope.chunk import MEMORIES, RESIDUAL, cms_level_chunked, self_modifying_chunked
from ..ops.hope.naive import cms_level_reference, self_modifying_reference


SCANS = {"chunk": (self_modifying_chunked, cms_level_chunked),
         "reference": (self_modifying_reference, cms_level_reference)}


# ------------------------------------------------------------------------------ modules


def _mlp_shapes(d: int, hidden: int, out: int) -> dict:
    return {"W1": (d, hidden), "W2": (hidden, out)}


class CMSLevel(nn.Module):
    """One level of the continuum memory system (see the module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, span: int, expansion: int, base_lr: float, eps: float):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.span, self.base_lr = span, base_lr
        d = self.head_dim
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.lr_gate = nn.Linear(hidden_size, num_heads, bias=True)
        for n, s in _mlp_shapes(d, expansion * d, d).items():
            self.register_parameter(n, nn.Parameter(torch.zeros(num_heads, *s)))
        self.o_norm = HeadRMSNorm(d, eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    fast_weight_names = ("W1", "W2")

    def reset_memory_parameters(self, init=None) -> None:
        """θ_ℓ initial weights ~ N(0, 1/d_in); the lr gate's bias 0 (η ≈ base_lr/2)."""
        init = init or nn.init
        for n in self.fast_weight_names:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        init.zeros_(self.lr_gate.bias)

    def init_state(self, batch: int) -> LayerState:
        w = {n: getattr(self, n).float().unsqueeze(0).expand(batch, *getattr(self, n).shape)
             for n in self.fast_weight_names}
        return LayerState(weights=w, opt={"pending": {n: torch.zeros_like(t) for n, t in w.items()}})

    def _heads(self, t):
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def split_input(self, h):
        """(the input of this level's own heads, the input of its projections): both h here;
        tensor parallelism takes a rank's channels for the first (parallel/tensor.py)."""
        return h, h

    def forward(self, h, state: LayerState, scan, compute):
        h_heads, h_proj = self.split_input(h)
        k = l2_normalize(self._heads(h_heads).to(compute))
        v = self._heads(self.v_proj(h_proj)).to(compute)
        lr = self.base_lr * torch.sigmoid(self.lr_gate(h_proj).to(compute)).transpose(1, 2)
        w = {n: t.to(compute) for n, t in state.weights.items()}
        p = {n: t.to(compute) for n, t in state.opt["pending"].items()}
        y, w, p = scan(w, p, k, v, lr, state.position, self.span)
        y = self.o_norm(y.to(h.dtype)).transpose(1, 2).flatten(2)
        return h + self.o_proj(y), LayerState(weights=w, opt={"pending": p}, position=state.position + h.shape[1])


class HopeLayer(Mixer):
    """The Hope block as a mixer: y = CMS(W_o(RMSNorm_h(o) ⊙ SiLU(x W_g))) with o the self-modifying
    memory's read."""

    def __init__(self, hidden_size: int, num_heads: int, chunk_size: int = 16, expansion: int = 2,
                 base_lr: float = 0.1, cms_chunk_sizes=(128, 512, 2048), conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk", max_grad_norm: float | None = 1.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if scan_impl not in SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(SCANS)}")
        if chunk_size < 1 or expansion < 1 or not cms_chunk_sizes or min(cms_chunk_sizes) < 1:
            raise ValueError("hope chunk sizes and expansion must be ≥ 1 (and at least one CMS level)")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.chunk_size, self.base_lr, self.scan_impl = chunk_size, base_lr, scan_impl
        self.max_grad_norm = max_grad_norm
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.u_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_u = CausalConv1d(hidden_size, conv_kernel)
        for m in MEMORIES:  # the memories' initial weights: slow, per head
            for n, s in _mlp_shapes(d, expansion * d, d if RESIDUAL[m] else 1).items():
                self.register_parameter(f"{m}_{n}", nn.Parameter(torch.zeros(num_heads, *s)))
        self.lr_bias = nn.Parameter(torch.zeros(num_heads))
        self.decay_bias = nn.Parameter(torch.zeros(num_heads))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.cms = nn.ModuleList(CMSLevel(hidden_size, num_heads, int(c), expansion, base_lr, norm_eps)
                                 for c in cms_chunk_sizes)
        self.reset_memory_parameters()

    @property
    def fast_weight_names(self) -> list[str]:
        return [f"{m}_{n}" for m in MEMORIES for n in ("W1", "W2")]

    def reset_memory_parameters(self, init=None) -> None:
        """Memories ~ N(0, 1/d_in) with the residual MLPs' output layers scaled by 0.1 (M ≈ identity);
        biases: η ≈ base_lr/2, retention α = σ(4) ≈ 0.98."""
        init = init or nn.init
        for n in self.fast_weight_names:
            p = getattr(self, n)
            residual_out = n.endswith("W2") and RESIDUAL[n.rsplit("_", 1)[0]]
            init.normal_(p, mean=0.0, std=(0.1 if residual_out else 1.0) * p.shape[-2] ** -0.5)
        init.zeros_(self.lr_bias)
        init.constant_(self.decay_bias, 4.0)

    def _initial(self, batch: int) -> dict:
        return {m: {n: getattr(self, f"{m}_{n}").float().unsqueeze(0).expand(batch, *getattr(self, f"{m}_{n}").shape)
                    for n in ("W1", "W2")} for m in MEMORIES}

    def init_state(self, batch_size: int) -> LayerState:
        return LayerState(weights=self._initial(batch_size),
                          extra={f"cms{i}": level.init_state(batch_size) for i, level in enumerate(self.cms)})

    def _heads(self, t):
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, L2-normalised q/u and the output gate SiLU(x W_g):
        (q, u [B, H, T, d], gate [B, T, H, d], the activation dtype, halo {"conv"})."""
        compute = torch.promote_types(x.dtype, torch.float32)
        conv = {}
        q, conv["q"] = self.conv_q(self.q_proj(x), state.conv.get("q"))
        u, conv["u"] = self.conv_u(self.u_proj(x), state.conv.get("u"))
        q, u = (l2_normalize(self._heads(F.silu(t)).to(compute)) for t in (q, u))
        gate = F.silu(self._heads(self.g_proj(x)).transpose(1, 2))
        return q, u, gate, x.dtype, {"conv": conv}

    def scan(self, inputs: tuple, state: LayerState):
        """The self-modifying memory, then the CMS levels on its projected read (each level reads the
        previous one's output, so all of them are sequential): (h [B, T, C], state)."""
        q, u, gate, dtype, halo = inputs
        memory_scan, cms_scan = SCANS[self.scan_impl]
        compute = q.dtype

        def cast(tree):
            return None if tree is None else {m: {n: t.to(compute) for n, t in w.items()} for m, w in tree.items()}

        o, weights, anchor = memory_scan(cast(state.weights), cast(state.anchor), q, u, self.lr_bias.to(compute),
                                         self.decay_bias.to(compute), self.base_lr, state.position, self.chunk_size,
                                         self.max_grad_norm)
        o = self.o_norm(o.to(dtype)).transpose(1, 2)
        h = self.o_proj((o * gate).flatten(2))
        extra = {}
        for i, level in enumerate(self.cms):
            st = state.extra[f"cms{i}"]
            st = LayerState(weights=st.weights, opt=st.opt, position=state.position)
            h, extra[f"cms{i}"] = level(h, st, cms_scan, compute)
        return h, LayerState(weights=weights, anchor=anchor, extra=extra, position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h


def build_hope_mixer(config) -> HopeLayer:
    return HopeLayer(config.hidden_size, config.num_attention_heads, chunk_size=config.hope_chunk_size,
                     expansion=config.hope_memory_expansion, base_lr=config.hope_base_lr,
                     cms_chunk_sizes=config.hope_cms_chunk_sizes, conv_kernel=config.conv_kernel,
                     norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl, max_grad_norm=config.titans_max_grad_norm)
