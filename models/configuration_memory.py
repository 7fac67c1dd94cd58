"""Hugging Face configuration of the memory-layer language model.

Only torch/transformers are imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from transformers import PretrainedConfig

MEMORY_LAYERS = {"ttt_linear": "linear", "ttt_mlp": "mlp"}


class MemoryLMConfig(PretrainedConfig):
    """A decoder of residual blocks ``[pre-conv] → norm → memory layer → norm → SwiGLU MLP``.

    The defaults are the official TTT code's (TTT-1B sizes); presets live in ``models.presets``.
    Args beyond the usual decoder ones:
        memory_layer: ``ttt_linear`` or ``ttt_mlp``.
        mini_batch_size: tokens per inner mini-batch (TTT's b).
        ttt_base_lr: base inner learning rate (η = base_lr/head_dim · σ(·) · s_i).
        inner_expansion: hidden width factor of the TTT-MLP inner model.
        pre_conv / conv_kernel: causal depthwise conv before each memory layer (Mamba backbone).
        share_qk: one q/k projection followed by two causal convs.
        use_gate: GELU gate on the memory layer's output.
        scan_checkpoint_group_size: mini-batches per recomputed group in the scan (0 = off).
        scan_impl: ``chunk`` (dual form, default) or ``reference`` (token by token).
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
