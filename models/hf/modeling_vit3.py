"""Hugging Face ViT³ image classifier (Han et al. 2025, arXiv 2512.01643), the authors' plain ViT³:

    x = PatchEmbed(image)                                  (conv, kernel = stride = patch size)
    for each block:  x += CPE(x);  x += ViT³(LN(x));  x += MLP(LN(x))
    logits = head(mean_n LN(x)_n)

CPE is a 3×3 depthwise conv on the token grid (the model's only positional information: there is
no position table and no class token, so any image size that is a multiple of the patch works).
ViT³ is the non-causal test-time-training mixer of ``vit3.py``. The per-block trained fast weights
are returned as ``memory_state`` when asked for and may be passed to the next call (a second view
of the same images continues each block's inner training from them).
Only torch/transformers are imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ..layers.vit3 import ViT3Layer
from .configuration_vit3 import ViT3Config


try:  # transformers ≥ 5: initialisers that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


@dataclass
class ViT3Output(ModelOutput):
    """loss/logits (classifier); last_hidden_state [B, N, dim] after the final LayerNorm;
    pooler_output [B, dim] its token mean; memory_state: per block, the ViT³ layer's ``LayerState``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    memory_state: list | None = None
    hidden_states: tuple | None = None


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability p (rescaled)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ViT3MLP(nn.Module):
    """fc2(GELU(fc1(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def to_grid(x: torch.Tensor, grid) -> torch.Tensor:
    """[B, h·w, C] (row-major tokens) → [B, C, h, w]."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *grid)


class ViT3Block(nn.Module):
    def __init__(self, config: ViT3Config, drop_path: float = 0.0):
        super().__init__()
        dim = config.hidden_size
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mixer = ViT3Layer(dim, config.num_attention_heads, qkv_bias=config.qkv_bias, inner_lr=config.inner_lr,
                               scale=config.inner_scale, scan_impl=config.scan_impl)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ViT3MLP(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid, state=None):
        x = x + self.cpe(to_grid(x, grid)).flatten(2).transpose(1, 2)
        y, state = self.mixer(self.norm1(x), state, grid=grid)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, state


class ViT3PreTrainedModel(PreTrainedModel):
    config_class = ViT3Config
    base_model_prefix = "vit3"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViT3Block"]

    def _init_weights(self, module):
        """The authors' init: trunc-normal(0.02) linears with zero biases, a zero classifier head
        (``ViT3ForImageClassification``), PyTorch's default conv init, trunc-normal initial fast weights."""
        if isinstance(module, nn.Linear):
            if module is getattr(self, "classifier", None):
                init.zeros_(module.weight)
            else:
                init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViT3Layer):
            module.reset_memory_parameters(init)


class ViT3Model(ViT3PreTrainedModel):
    """Patch embedding and ViT³ blocks; returns the normalised tokens and their mean."""

    def __init__(self, config: ViT3Config):
        super().__init__(config)
        dim = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size)
        L = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(L - 1, 1) for i in range(L)]  # linear, as torch.linspace
        self.blocks = nn.ModuleList(ViT3Block(config, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, memory_state: list | None = None,
                output_hidden_states: bool = False, return_memory_state: bool = False) -> ViT3Output:
        c, p = self.config.num_channels, self.config.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c:
            raise ValueError(f"expected pixel_values of shape [batch, {c}, height, width], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[2] % p or pixel_values.shape[3] % p:
            raise ValueError(f"image size {tuple(pixel_values.shape[2:])} is not a multiple of patch_size {p}")
        if memory_state is not None and len(memory_state) != len(self.blocks):
            raise ValueError(f"memory_state has {len(memory_state)} entries for {len(self.blocks)} blocks")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        states = memory_state if memory_state is not None else [None] * len(self.blocks)
        new_states, hidden = [], []
        for block, st in zip(self.blocks, states):
            if self.gradient_checkpointing and self.training:
                x, st = checkpoint(block, x, grid, st, use_reentrant=False)
            else:
                x, st = block(x, grid, st)
            new_states.append(st)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return ViT3Output(last_hidden_state=x, pooler_output=x.mean(1),
                          memory_state=new_states if return_memory_state else None,
                          hidden_states=tuple(hidden) if output_hidden_states else None)


class ViT3ForImageClassification(ViT3PreTrainedModel):
    def __init__(self, config: ViT3Config):
        super().__init__(config)
        self.vit3 = ViT3Model(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, memory_state: list | None = None,
                output_hidden_states: bool | None = None, return_memory_state: bool = False,
                return_dict: bool | None = None, **kwargs) -> ViT3Output:
        """Logits [B, num_labels]; with ``labels``: cross-entropy (integer labels), or MSE when
        ``num_labels`` = 1, or BCE-with-logits for float multi-label targets."""
        out = self.vit3(pixel_values, memory_state, bool(output_hidden_states), return_memory_state)
        logits = self.classifier(out.pooler_output)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            elif labels.dtype in (torch.long, torch.int):
                loss = F.cross_entropy(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return ViT3Output(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state,
                          pooler_output=out.pooler_output, memory_state=out.memory_state,
                          hidden_states=out.hidden_states)
