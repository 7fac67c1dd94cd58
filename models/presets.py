"""Model size presets, as data. The 125m–1b sizes equal the official TTT configurations."""
from __future__ import annotations

from .configuration_memory import MemoryLMConfig

# name -> MemoryLMConfig fields (the official TTT_STANDARD_CONFIGS, plus tiny ones for tests/CPU)
PRESETS: dict[str, dict] = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
    # a few-million-parameter model that trains on CPU in minutes
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=8192, max_position_embeddings=2048),
    # the smallest sensible model, for unit tests
    "test": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=128, max_position_embeddings=256),
}


def preset_config(name: str, **overrides) -> MemoryLMConfig:
    """MemoryLMConfig of a preset, e.g. ``preset_config("125m", memory_layer="ttt_mlp")``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return MemoryLMConfig(**{**PRESETS[name], **overrides})
