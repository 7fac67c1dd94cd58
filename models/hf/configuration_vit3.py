"""Hugging Face configuration of the ViT³ image classifier, and its size presets.

Only transformers is imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from transformers import PretrainedConfig


# The authors' ImageNet-1k models (LeapLabTHU/ViTTT vittt/models/vittt.py; 224² images, patch 16):
# ViT³-T 6M params 76.5% top-1, ViT³-S 24M 81.6%, ViT³-B 90M 82.6%. "test" is for unit tests.
VIT3_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=6),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "test": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                 num_labels=4),
}


class ViT3Config(PretrainedConfig):
    """A plain (non-hierarchical) ViT³: patch embedding → blocks → LayerNorm → mean pool → linear head.

    Block (the authors' ``vittt.py``): x += CPE(x) (3×3 depthwise conv on the token grid, the only
    positional information); x += ViT³(LN(x)); x += MLP(LN(x)) (GELU, ``mlp_ratio``·dim hidden).
    Args beyond the usual ones:
        image_size: nominal input size (any multiple of ``patch_size`` is accepted: there is no
            position table).
        mlp_ratio: MLP hidden width factor.
        qkv_bias: bias of the ViT³ qkv projection.
        inner_lr: the inner step size (1.0 in the paper).
        inner_scale: s in ℓ = −(s/N) Σ⟨f(k), v⟩ (None = 9^{−1/2}, the authors' value).
        drop_path_rate: stochastic depth, linearly increasing over the blocks (0 = off).
        layer_norm_eps: eps of every LayerNorm.
        scan_impl: ``chunk`` (batched closed form) or ``reference`` (token-by-token autograd).
    ``num_labels`` (from ``PretrainedConfig``) is the number of classes.
    """

    model_type = "vit3"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        inner_lr: float = 1.0,
        inner_scale: float | None = None,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        scan_impl: str = "chunk",
        **kwargs,
    ):
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", 1000)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.inner_lr = inner_lr
        self.inner_scale = inner_scale
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.scan_impl = scan_impl
        super().__init__(**kwargs)
        self.validate_vit3_config()

    def validate_vit3_config(self) -> None:
        """Raises ValueError with one clear message for an inconsistent configuration."""
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.scan_impl not in ("chunk", "reference"):
            raise ValueError(f"unknown scan_impl {self.scan_impl!r}; expected 'chunk' or 'reference'")


def vit3_preset_config(name: str, **overrides) -> ViT3Config:
    """ViT3Config of a preset, e.g. ``vit3_preset_config("tiny", num_labels=10, image_size=32, patch_size=4)``."""
    if name not in VIT3_PRESETS:
        raise ValueError(f"unknown ViT³ preset {name!r}; expected one of {sorted(VIT3_PRESETS)}")
    return ViT3Config(**{**VIT3_PRESETS[name], **overrides})
