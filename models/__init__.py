"""Memory-layer models: plain single-device PyTorch, Hugging Face compatible.

Importing this package registers ``memory_lm`` with the transformers Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works without ``trust_remote_code``; likewise
``vit3`` (the ViT³ image classifier) with ``AutoModelForImageClassification``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .hf.configuration_memory import MEMORY_LAYERS, MemoryLMConfig
from .hf.modeling_memory import MemoryBlock, MemoryLMForCausalLM, MemoryLMModel, MemoryLMOutput, MemoryState
from .presets import PRESETS, preset_config
from .layers.ttt import TTTLayer, TTTState
from .hf.configuration_vit3 import VIT3_PRESETS, ViT3Config, vit3_preset_config
from .hf.modeling_vit3 import ViT3ForImageClassification, ViT3Model
from .layers.vit3 import ViT3Layer

AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig, exist_ok=True)
AutoModel.register(MemoryLMConfig, MemoryLMModel, exist_ok=True)
AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)
AutoConfig.register(ViT3Config.model_type, ViT3Config, exist_ok=True)
AutoModel.register(ViT3Config, ViT3Model, exist_ok=True)
AutoModelForImageClassification.register(ViT3Config, ViT3ForImageClassification, exist_ok=True)

__all__ = [
    "MEMORY_LAYERS",
    "PRESETS",
    "MemoryBlock",
    "MemoryLMConfig",
    "MemoryLMForCausalLM",
    "MemoryLMModel",
    "MemoryLMOutput",
    "MemoryState",
    "TTTLayer",
    "TTTState",
    "VIT3_PRESETS",
    "ViT3Config",
    "ViT3ForImageClassification",
    "ViT3Layer",
    "ViT3Model",
    "vit3_preset_config",
    "preset_config",
]
