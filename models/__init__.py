"""Memory-layer models: plain single-device PyTorch, Hugging Face compatible.

Importing this package registers ``memory_lm`` with the transformers Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works without ``trust_remote_code``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_memory import MEMORY_LAYERS, MemoryLMConfig
from .modeling_memory import MemoryBlock, MemoryLMForCausalLM, MemoryLMModel, MemoryLMOutput, MemoryState
from .presets import PRESETS, preset_config
from .ttt import TTTLayer, TTTState

AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig, exist_ok=True)
AutoModel.register(MemoryLMConfig, MemoryLMModel, exist_ok=True)
AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)

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
    "preset_config",
]
