"""TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at Test Time)", arXiv 2407.04620).

Per head the layer keeps an inner model f_θ (linear map or 2-layer MLP) and, while reading the
sequence, trains it on the self-supervised task "reconstruct v − k from k":

    η_t = (base_lr / d) · σ(x_t w_h + b_h) · s_{t mod b}          learnable inner learning rate
    ℓ_t(θ) = ½ ‖LN(f_θ(k_t)) − (v_t − k_t)‖²                         LN-fused reconstruction loss
    θ_t = θ₀ − s_i Σ_{j≤t} η_j ∇ℓ_j(θ₀)                              mini-batch GD (b tokens)
    o_t = q_t + LN(f_{θ_t}(q_t));  y = W_o · gate(x) ⊙ LayerNorm(o)

with RoPE on q, k at position t mod b, an optional causal conv on the shared q/k projection
(``share_qk``) and an optional GELU gate (``use_gate``, the Mamba-style backbone).
``forward(x, state) -> (y, state)``: the state carries everything needed to continue a sequence
exactly from any split point. Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..common.knobs import lr_schedule, next_token_pairs
from ..common.modules import CausalConv1d, apply_interleaved_rope, rope_cos_sin
from ..common.parts import InnerKnobs, inner_param_shapes
from ..common.state import Mixer, StateTree
from ..ops.ttt.chunk import ttt_scan_chunked
from ..ops.ttt.knobs import ttt_scan_knobs
from ..ops.ttt.naive import ttt_scan_reference


SCAN_IMPLS = {"chunk": ttt_scan_chunked, "reference": ttt_scan_reference}


@dataclass
class TTTState(StateTree):
    """What a TTT layer carries from one call to the next (per batch row, per head).

    weights:  fast weights θ₀ at the last mini-batch boundary, {W1, b1[, W2, b2]}: [B, H, ...] float32
    pending:  Σ η_j ∇ℓ_j(θ₀) of the unfinished mini-batch, same shapes; None at a boundary
    position: tokens consumed so far (sets the in-mini-batch index and the RoPE phase)
    conv:     tails of the causal q/k convolutions, {"q", "k"}: [B, C, K-1] (share_qk only)
    prev_key: the last inner-loop key [B, H, d] (``inner_loss="next_token"`` only)
    """

    weights: dict
    pending: dict | None = None
    position: int = 0
    conv: dict = field(default_factory=dict)
    prev_key: torch.Tensor | None = None


class TTTLayer(Mixer):
    """Sequence mixer with a TTT-Linear (``inner="linear"``) or TTT-MLP (``inner="mlp"``) memory."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        inner: str = "linear",
        mini_batch_size: int = 16,
        base_lr: float = 1.0,
        rope_theta: float = 10000.0,
        share_qk: bool = False,
        conv_kernel: int = 4,
        use_gate: bool = False,
        inner_expansion: int = 4,
        scan_checkpoint_group_size: int = 0,
        scan_impl: str = "chunk",
        knobs: InnerKnobs | None = None,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(SCAN_IMPLS)}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self.inner, self.mini_batch_size, self.base_lr = inner, mini_batch_size, base_lr
        self.rope_theta, self.share_qk, self.use_gate = rope_theta, share_qk, use_gate
        self.scan_checkpoint_group_size, self.scan_impl = scan_checkpoint_group_size, scan_impl
        if knobs is not None and knobs.loss == "ln_recon":  # TTT's own loss
            knobs = InnerKnobs(knobs.steps, knobs.grad_clip, knobs.init_pull, knobs.lr_decay, None)
        if knobs is not None and knobs.loss not in (None, "mse", "next_token"):
            raise ValueError(f"TTT supports inner_loss ln_recon/mse/next_token, got {knobs.loss!r}")
        if knobs is not None and knobs.steps != 1 and knobs.init_pull:
            raise ValueError("inner_steps > 1 is implemented for TTT without inner_init_pull only")
        self.knobs = None if knobs == InnerKnobs() else knobs  # None: exactly the plain TTT code path

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if share_qk:  # one projection, two causal convs give q and k
            self.conv_q = CausalConv1d(hidden_size, conv_kernel)
            self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        else:
            self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.lr_gate = nn.Linear(hidden_size, num_heads, bias=True)  # row h: w_h, b_h of η
        self.token_idx_offset = nn.Parameter(torch.zeros(mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        for name, shape in inner_param_shapes(inner, self.head_dim, inner_expansion).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(num_heads, *shape)))
        self.post_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.reset_fast_weights()

    @property
    def fast_weight_names(self) -> list[str]:
        return ["W1", "b1"] + (["W2", "b2"] if self.inner == "mlp" else [])

    def reset_fast_weights(self, std: float = 0.02) -> None:
        """Initial fast weights as the paper's code: W ~ N(0, std), b = 0."""
        with torch.no_grad():
            for name in self.fast_weight_names:
                p = getattr(self, name)
                p.normal_(0.0, std) if name.startswith("W") else p.zero_()

    def init_state(self, batch_size: int) -> TTTState:
        """The state before the first token: θ₀ tiled over the batch (kept differentiable)."""
        weights = {}
        for n in self.fast_weight_names:  # float32, or float64 in a float64 model
            p = getattr(self, n)
            weights[n] = p.to(torch.promote_types(p.dtype, torch.float32)).unsqueeze(0).expand(batch_size, *p.shape)
        return TTTState(weights=weights)

    # -------------------------------------------------------------------------------- forward
    def _qkv(self, x: torch.Tensor, state: TTTState):
        new_conv = {}
        if self.share_qk:
            xq = self.q_proj(x)
            q, new_conv["q"] = self.conv_q(xq, state.conv.get("q"))
            k, new_conv["k"] = self.conv_k(xq, state.conv.get("k"))
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        return q, k, self.v_proj(x), new_conv

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def prepare(self, x: torch.Tensor, state: TTTState):
        """Everything before the scan (models/common/state.py): q, k, v [B, H, T, d] (RoPE'd) and the inner
        learning rate lr [B, H, T], all in the compute dtype (≥ float32), and the halo {"conv": the
        new q/k conv tails}."""
        T = x.shape[1]
        q, k, v, new_conv = self._qkv(x, state)
        q, k, v = (self._split_heads(t) for t in (q, k, v))

        positions = torch.arange(state.position, state.position + T, device=x.device)
        cos, sin = rope_cos_sin(positions % self.mini_batch_size, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        lr = torch.sigmoid(self.lr_gate(x)).transpose(1, 2) * (self.base_lr / self.head_dim)  # [B, H, T]

        # The inner loop runs in (at least) float32 whatever the activation dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        q, k, v, lr = (t.to(compute) for t in (q, k, v, lr))
        return q, k, v, lr, {"conv": new_conv}

    def scan_from(self, weights: dict, pending: dict | None, q, k, v, lr, position: int, heads: slice = slice(None)):
        """The inner loop from fast weights ``weights`` (+ ``pending``) at ``position`` (Ulysses
        scans a slice of the heads from the initial weights with it). ``heads``: which of this layer's heads q, k, v hold (default all).
        Returns (out [B, H, T, d], weights, pending-or-None)."""
        compute = q.dtype
        if self.knobs is not None:
            if self.knobs.next_token:
                raise ValueError("inner_loss='next_token' keeps the previous key in the layer state: call the layer "
                                 "(forward), not scan_from (which does not carry it)")
            if self.knobs.steps > 1 and pending is not None and not any("@" in n for n in pending):
                raise ValueError("inner_steps > 1 keeps one pending sum per step: a piece that starts inside a "
                                 "mini-batch needs all of them (under context parallelism make each rank's length "
                                 "a multiple of mini_batch_size)")
            return self._scan_knobs(weights, pending, q, k, v, lr, position, heads, None)[:3]
        return SCAN_IMPLS[self.scan_impl](
            self.inner,
            {n: t.to(compute) for n, t in weights.items()},
            None if pending is None else {n: t.to(compute) for n, t in pending.items()},
            q, k, v, lr,
            self.token_idx_offset.to(compute),
            self.ttt_norm_weight[heads].to(compute),
            self.ttt_norm_bias[heads].to(compute),
            position,
            self.mini_batch_size,
            self.scan_checkpoint_group_size if self.training else 0,
        )

    def scan(self, inputs: tuple, state: TTTState):
        """The inner loop from ``state``: (out [B, H, T, d], the state after the last token)."""
        q, k, v, lr, halo = inputs
        position = state.position + q.shape[2]
        if self.knobs is not None:
            out, weights, pending, last_key = self._scan_knobs(state.weights, state.pending, q, k, v, lr,
                                                               state.position, slice(None), state.prev_key)
            return out, TTTState(weights=weights, pending=pending, position=position, conv=halo["conv"],
                                 prev_key=last_key if self.knobs.next_token else None)
        out, weights, pending = self.scan_from(state.weights, state.pending, q, k, v, lr, state.position)
        return out, TTTState(weights=weights, pending=pending, position=position, conv=halo["conv"])

    def _scan_knobs(self, weights, pending, q, k, v, lr, position: int, heads, prev_key):
        """:meth:`scan_from` with the inner-loop knobs (models/common/knobs.py); also returns the last key."""
        compute, B = q.dtype, q.shape[0]
        cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
        init = {n: getattr(self, n)[heads].to(compute).unsqueeze(0).expand(B, *getattr(self, n)[heads].shape)
                for n in self.fast_weight_names}
        args = (self.token_idx_offset.to(compute), self.ttt_norm_weight[heads].to(compute),
                self.ttt_norm_bias[heads].to(compute), position, self.mini_batch_size)
        if self.scan_impl == "reference":
            return ttt_scan_reference(self.inner, cast(weights), cast(pending), q, k, v, lr, *args,
                                      knobs=self.knobs, init=init, prev_key=prev_key)
        lr = lr_schedule(lr, position, self.knobs)
        last_key = None
        if self.knobs.next_token:
            k, (lr,), last_key = next_token_pairs(k, [lr], prev_key)
        if self.knobs.inputs_only:  # schedule / next_token change only the inputs: the plain fast scan
            return (*ttt_scan_chunked(self.inner, cast(weights), cast(pending), q, k, v, lr, *args,
                                      self.scan_checkpoint_group_size if self.training else 0), last_key)
        return (*ttt_scan_knobs(self.inner, cast(weights), cast(pending), q, k, v, lr, *args, self.knobs, init),
                last_key)

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Post-norm over all heads, optional gate, output projection."""
        out = self.post_norm(out.to(x.dtype).transpose(1, 2).flatten(2))
        if self.use_gate:
            out = F.gelu(self.g_proj(x), approximate="tanh") * out
        return self.o_proj(out)
