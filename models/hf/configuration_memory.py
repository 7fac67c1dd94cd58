"""Hugging Face configuration of the memory-layer language model.

Only torch/transformers are imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from ..layers.registry import LAYERS, registered_options


# derived from the layer registry (models/layers/registry.py): memory_layer name → its family tag (for TTT:
# the inner model kind), the attention layers, and for each inner-loop knob (common.parts.InnerKnobs,
# models/common/knobs.py; inner_loss per value, the layer's own loss accepted as a no-op) the layers that take it
MEMORY_LAYERS = {n: s.family for n, s in LAYERS.items() if s.kind == "memory"}
ATTENTION_LAYERS = {n: s.family for n, s in LAYERS.items() if s.kind == "attention"}
INNER_KNOB_LAYERS = {knob: tuple(n for n, s in LAYERS.items() if knob in s.inner_knobs)
                     for knob in ("inner_steps", "inner_grad_clip", "inner_init_pull", "inner_lr_schedule",
                                  "inner_loss=ln_recon", "inner_loss=mse", "inner_loss=next_token")}


def parse_inner_lr_schedule(schedule) -> float:
    """``"constant"`` (or None) → 0; ``"inverse:DECAY"`` → DECAY (η_t ← η_t/(1 + t·DECAY), DECAY ≥ 0)."""
    if schedule in (None, "constant"):
        return 0.0
    if isinstance(schedule, str) and schedule.startswith("inverse:"):
        try:
            decay = float(schedule.split(":", 1)[1])
        except ValueError:
            decay = -1.0
        if decay >= 0:
            return decay
    raise ValueError(f"unknown inner_lr_schedule {schedule!r}; expected 'constant' or 'inverse:DECAY' with DECAY ≥ 0 "
                     "(η_t ← η_t/(1 + t·DECAY), t the position in the document)")
# short names accepted in layer_pattern
PATTERN_ALIASES = {"memory": None, "m": None, "s": "swa", "a": "attention", "full": "attention"}
# inner optimizers each family accepts (the first is its default)
INNER_OPTIMIZERS = {s.family: s.inner_optimizers for s in LAYERS.values() if s.inner_optimizers}


def _int_list(value) -> list[int]:
    """A list of ints from a list/tuple, one int, or a comma/space-separated string ("8,16")."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif isinstance(value, int):
        value = [value]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"expected a list of integers, got {value!r}") from None


class MemoryLMConfig(PretrainedConfig):
    """A decoder of residual blocks ``[pre-conv] → norm → memory layer → norm → SwiGLU MLP``.

    The defaults are the official TTT code's (TTT-1B sizes); presets live in ``models.presets``.
    Args beyond the usual decoder ones:
        memory_layer: any registered memory layer, a key of ``MEMORY_LAYERS`` (TTT-Linear/MLP, DeltaNet/GDN,
            Titans and its MAC/MAG/MAL variants, Moneta/Yaad/Memora, ATLAS, LaCT, TNT, Hope, KDA); the
            family's own options are the ``<family>_*`` fields below, or those its ``LayerSpec.options``
            registers (models/layers/registry.py; KDA's ``kda_chunk_size``), accepted as keyword arguments.
        mini_batch_size: tokens per inner mini-batch (TTT's b).
        ttt_base_lr: base inner learning rate (η = base_lr/head_dim · σ(·) · s_i).
        inner_expansion: hidden width factor of the TTT-MLP inner model.
        pre_conv / conv_kernel: causal depthwise conv before each memory layer (Mamba backbone).
        share_qk: one q/k projection followed by two causal convs.
        use_gate: GELU gate on the memory layer's output.
        scan_checkpoint_group_size: chunks (TTT: mini-batches) per recomputed piece of the scan in training (0 = off).
        scan_impl: ``chunk`` (dual form, default) or ``reference`` (token by token).
        layer_pattern: per-layer mixer types, cycled over the layers: a list or a comma/space-separated
            string of ``memory`` (= ``memory_layer``; also ``M``), ``swa`` (``S``), ``attention`` (``A``)
            or any memory-layer name; its length must divide ``num_hidden_layers``. None = all memory.
        attention_window: window of ``swa`` layers and of the attention inside Titans/LaCT blocks.
        attention_rope_theta: RoPE base of the attention (None = ``rope_theta``).
        deltanet_chunk_size: WY chunk length of (Gated) DeltaNet (any value gives the same result).
        titans_chunk_size: frozen-gradient chunk of the Titans memory (a model hyperparameter).
        titans_memory_depth / titans_memory_expansion: layers and hidden width factor of its MLP.
        titans_base_lr: upper bound of the per-token inner step size θ_t (0.01: at 0.1 an untrained
            memory diverges chunk by chunk on real text and the step-1 gradient norm is ~150).
        titans_segment_size: MAC segment length (a multiple of ``titans_chunk_size``).
        titans_max_grad_norm: soft clamp τ of each token's inner gradient norm per memory layer
            (‖g‖ → τ·tanh(‖g‖/τ); None = off), a stability guard against inner-loop divergence.
        num_persistent_tokens: learnable always-visible tokens of the Titans blocks' attention.
        inner_optimizer: Titans ``momentum`` | ``sgd``; LaCT ``muon`` | ``sgd`` (None = the default).
        miras_chunk_size / miras_memory_expansion / miras_base_lr: frozen-gradient chunk, MLP width
            factor and upper bound of the inner step of Moneta, Yaad and Memora.
        miras_p / miras_q: Moneta's ℓ_p attentional bias and ℓ_q retention exponents (p ≥ 1, q ≥ 2).
        atlas_chunk_size / atlas_window / atlas_poly_degree / atlas_memory_expansion / atlas_base_lr:
            ATLAS's frozen-gradient chunk, Omega-rule window c (c = 1: the current token only), degree
            of the polynomial feature map of keys/queries, MLP width factor, upper bound of the step
            (None: 0.1 with Muon, whose orthogonalised step has unit scale, 1e-4 with ``momentum`` /
            ``sgd``, whose raw step sums the gradient over features and window: 0.1 is NaN at init);
            its ``inner_optimizer``: ``muon`` (default) | ``momentum`` | ``sgd`` (OmegaNet).
        inner_steps / inner_grad_clip / inner_init_pull / inner_lr_schedule / inner_loss: the inner
            loop's knobs (docs/models.md "Inner-loop knobs"; ``INNER_KNOB_LAYERS`` lists which layers
            take each): K sub-steps per token (DeltaProduct), per-token gradient clip τ (None = off),
            pull λ toward the initial fast weights, ``constant`` | ``inverse:DECAY`` inner-lr schedule,
            inner loss None (the layer's own) | ``ln_recon`` | ``mse`` | ``next_token``.
        lact_chunk_size / lact_num_heads / lact_inter_multi / lact_base_lr / lact_momentum: LaCT's
            update chunk, fast-weight heads, SwiGLU width factor, base inner lr, momentum switch.
        tnt_global_chunk_size / tnt_local_chunk_sizes / tnt_reset_period: TNT's global chunk C_G, the
            chunk C_L of each local memory (a list: one local memory per entry), and the period S_L at
            which the local memories restart from their initial weights (None = C_G; a multiple of
            every C_L). The memories themselves use the titans_* fields and inner_optimizer.
        hope_chunk_size: the self-modifying memory's chunk (keys, values, rates and targets are
            generated by the memories as they were at the chunk start).
        hope_memory_expansion: hidden width factor of Hope's MLP memories and CMS levels.
        hope_base_lr: upper bound of Hope's inner learning rates (memories and CMS levels).
        hope_cms_chunk_sizes: update period of each continuum-memory level (one level per entry).
    """

    model_type = "memory_lm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5504,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id=None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = True,
        rope_theta: float = 10000.0,
        memory_layer: str = "ttt_linear",
        mini_batch_size: int = 16,
        ttt_base_lr: float = 1.0,
        inner_expansion: int = 4,
        pre_conv: bool = False,
        conv_kernel: int = 4,
        share_qk: bool = False,
        use_gate: bool = False,
        scan_checkpoint_group_size: int = 0,
        scan_impl: str = "chunk",
        layer_pattern=None,
        attention_window: int = 2048,
        attention_rope_theta: float | None = None,
        deltanet_chunk_size: int = 64,
        titans_chunk_size: int = 64,
        titans_memory_depth: int = 2,
        titans_memory_expansion: int = 2,
        titans_base_lr: float = 0.01,
        titans_segment_size: int = 512,
        titans_max_grad_norm: float | None = 1.0,
        num_persistent_tokens: int = 4,
        inner_optimizer: str | None = None,
        inner_steps: int = 1,
        inner_grad_clip: float | None = None,
        inner_init_pull: float = 0.0,
        inner_lr_schedule: str = "constant",
        inner_loss: str | None = None,
        lact_chunk_size: int = 2048,
        lact_num_heads: int = 4,
        lact_inter_multi: int = 1,
        lact_base_lr: float = 1e-3,
        lact_momentum: bool = True,
        miras_chunk_size: int = 16,
        miras_memory_expansion: int = 4,
        miras_base_lr: float = 0.1,
        miras_p: float = 3.0,
        miras_q: float = 4.0,
        atlas_chunk_size: int = 16,
        atlas_window: int = 8,
        atlas_poly_degree: int = 2,
        atlas_memory_expansion: int = 2,
        atlas_base_lr: float | None = None,
        tnt_global_chunk_size: int = 2048,
        tnt_local_chunk_sizes=(64,),
        tnt_reset_period: int | None = None,
        hope_chunk_size: int = 16,
        hope_memory_expansion: int = 2,
        hope_base_lr: float = 0.1,
        hope_cms_chunk_sizes=(128, 512, 2048),
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.memory_layer = memory_layer
        self.mini_batch_size = mini_batch_size
        self.ttt_base_lr = ttt_base_lr
        self.inner_expansion = inner_expansion
        self.pre_conv = pre_conv
        self.conv_kernel = conv_kernel
        self.share_qk = share_qk
        self.use_gate = use_gate
        self.scan_checkpoint_group_size = scan_checkpoint_group_size
        self.scan_impl = scan_impl
        self.layer_pattern = layer_pattern
        self.attention_window = attention_window
        self.attention_rope_theta = attention_rope_theta
        self.deltanet_chunk_size = deltanet_chunk_size
        self.titans_chunk_size = titans_chunk_size
        self.titans_memory_depth = titans_memory_depth
        self.titans_memory_expansion = titans_memory_expansion
        self.titans_base_lr = titans_base_lr
        self.titans_segment_size = titans_segment_size
        self.titans_max_grad_norm = titans_max_grad_norm
        self.num_persistent_tokens = num_persistent_tokens
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.inner_grad_clip = inner_grad_clip
        self.inner_init_pull = inner_init_pull
        self.inner_lr_schedule = inner_lr_schedule
        self.inner_loss = inner_loss
        self.lact_chunk_size = lact_chunk_size
        self.lact_num_heads = lact_num_heads
        self.lact_inter_multi = lact_inter_multi
        self.lact_base_lr = lact_base_lr
        self.lact_momentum = lact_momentum
        self.miras_chunk_size = miras_chunk_size
        self.miras_memory_expansion = miras_memory_expansion
        self.miras_base_lr = miras_base_lr
        self.miras_p = miras_p
        self.miras_q = miras_q
        self.atlas_chunk_size = atlas_chunk_size
        self.atlas_window = atlas_window
        self.atlas_poly_degree = atlas_poly_degree
        self.atlas_memory_expansion = atlas_memory_expansion
        self.atlas_base_lr = atlas_base_lr
        self.tnt_global_chunk_size = tnt_global_chunk_size
        self.tnt_local_chunk_sizes = _int_list(tnt_local_chunk_sizes)
        self.tnt_reset_period = tnt_reset_period
        self.hope_chunk_size = hope_chunk_size
        self.hope_memory_expansion = hope_memory_expansion
        self.hope_base_lr = hope_base_lr
        self.hope_cms_chunk_sizes = _int_list(hope_cms_chunk_sizes)
        for name, default in registered_options().items():  # the fields of layers registered with their own
            setattr(self, name, kwargs.pop(name, default))
        self.validate_memory_config()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mixer_types(self) -> list[str]:
        """The mixer type of every layer (``layer_pattern`` resolved and cycled)."""
        pattern = self.layer_pattern
        if pattern is None:
            return [self.memory_layer] * self.num_hidden_layers
        tokens = pattern.replace(",", " ").split() if isinstance(pattern, str) else list(pattern)
        if not tokens:
            raise ValueError("layer_pattern is empty")
        kinds = []
        for tok in tokens:
            name = str(tok).strip().lower()
            name = PATTERN_ALIASES.get(name, name) if name in PATTERN_ALIASES else name
            name = self.memory_layer if name is None else name
            if name not in MEMORY_LAYERS and name not in ATTENTION_LAYERS:
                raise ValueError(f"unknown layer type {tok!r} in layer_pattern; expected memory/M, swa/S, "
                                 f"attention/A or one of {sorted(MEMORY_LAYERS)}")
            kinds.append(name)
        if self.num_hidden_layers % len(kinds):
            raise ValueError(f"layer_pattern of length {len(kinds)} does not divide num_hidden_layers "
                             f"{self.num_hidden_layers}")
        return kinds * (self.num_hidden_layers // len(kinds))

    @property
    def inner_lr_decay(self) -> float:
        """The decay of ``inner_lr_schedule`` (0 = constant)."""
        return parse_inner_lr_schedule(self.inner_lr_schedule)

    def _validate_inner_knobs(self, kinds: set) -> None:
        """Each inner-loop knob that is set must be supported by every memory layer in the model."""
        if int(self.inner_steps) < 1:
            raise ValueError(f"inner_steps must be ≥ 1, got {self.inner_steps}")
        if self.inner_grad_clip is not None and not self.inner_grad_clip > 0:
            raise ValueError(f"inner_grad_clip must be > 0 (or None = off), got {self.inner_grad_clip}")
        if not self.inner_init_pull >= 0:
            raise ValueError(f"inner_init_pull must be ≥ 0, got {self.inner_init_pull}")
        if self.inner_loss not in (None, "ln_recon", "mse", "next_token"):
            raise ValueError(f"unknown inner_loss {self.inner_loss!r}; expected None (the layer's own), 'ln_recon', "
                             "'mse' or 'next_token'")
        used = {"inner_steps": int(self.inner_steps) != 1, "inner_grad_clip": self.inner_grad_clip is not None,
                "inner_init_pull": self.inner_init_pull != 0, "inner_lr_schedule": self.inner_lr_decay != 0,
                f"inner_loss={self.inner_loss}": self.inner_loss is not None}
        memories = sorted(k for k in kinds if k in MEMORY_LAYERS)
        for knob in (k for k, on in used.items() if on):
            bad = [k for k in memories if k not in INNER_KNOB_LAYERS[knob]]
            if bad:
                raise ValueError(f"{knob} is not supported by {bad}; layers that support it: "
                                 f"{list(INNER_KNOB_LAYERS[knob])}")

    def validate_memory_config(self) -> None:
        """Raises ValueError with one clear message for an inconsistent configuration."""
        if self.memory_layer not in MEMORY_LAYERS:
            raise ValueError(f"unknown memory_layer {self.memory_layer!r}; expected one of {sorted(MEMORY_LAYERS)}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even (RoPE rotates pairs)")
        for name in ("mini_batch_size", "conv_kernel", "num_hidden_layers", "vocab_size", "inner_expansion"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.scan_checkpoint_group_size < 0:
            raise ValueError("scan_checkpoint_group_size must be ≥ 0")
        if self.scan_impl not in ("chunk", "reference"):
            raise ValueError(f"unknown scan_impl {self.scan_impl!r}; expected 'chunk' or 'reference'")
        if self.hidden_act not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected silu, gelu or gelu_tanh")
        if int(self.attention_window) < 1:
            raise ValueError(f"attention_window must be ≥ 1, got {self.attention_window}")
        if self.num_persistent_tokens < 0:
            raise ValueError(f"num_persistent_tokens must be ≥ 0, got {self.num_persistent_tokens}")
        kinds = set(self.mixer_types)
        self._validate_inner_knobs(kinds)
        families = {MEMORY_LAYERS[k] for k in kinds if k in MEMORY_LAYERS}
        if self.inner_optimizer is not None:
            allowed = sorted({o for f in families for o in INNER_OPTIMIZERS.get(f, ())})
            bad = [f for f in families if self.inner_optimizer not in INNER_OPTIMIZERS.get(f, ())]
            if bad:
                raise ValueError(f"unknown inner_optimizer {self.inner_optimizer!r} for {sorted(bad)}; expected one of "
                                 f"{allowed or 'none (these layers have a fixed optimizer)'}")
        for kind in sorted(kinds):  # each layer type's own checks (models/layers/registry.py)
            if LAYERS[kind].validate is not None:
                LAYERS[kind].validate(self)
