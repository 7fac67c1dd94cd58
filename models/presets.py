"""Model size presets, as data. The 125m–1b sizes equal the official TTT configurations (the
same 125M/350M/760M/1.3B shapes the DeltaNet, Titans and LaCT papers compare at).

``preset_config(size, memory_layer=...)`` also applies that family's per-size defaults
(``FAMILY_DEFAULTS``) at the paper sizes and ``SMALL_FAMILY_DEFAULTS`` at ``tiny`` (sized for its
512-token training sequences); explicit overrides always win.
"""
from __future__ import annotations

from .hf.configuration_memory import MemoryLMConfig

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
PRESETS["1.3b"] = PRESETS["1b"]  # the papers' name for the same shape
PAPER_SIZES = ("125m", "350m", "760m", "1b", "1.3b")


def _heads_of(dim: int):
    return lambda p: p["hidden_size"] // dim


# memory_layer -> fields applied at the paper sizes; callables take the size preset's dict
FAMILY_DEFAULTS: dict[str, dict] = {
    # fla's DeltaNet/GDN use large heads (256 for GDN, with v twice as wide); here k = v = head dim: 128
    "deltanet": dict(num_attention_heads=_heads_of(128), deltanet_chunk_size=64),
    "gated_deltanet": dict(num_attention_heads=_heads_of(128), deltanet_chunk_size=64),
    # Titans (no official code; unverified paper details): 64-token chunks, 2-layer memory
    "titans": dict(num_attention_heads=_heads_of(64), titans_chunk_size=64, titans_memory_depth=2),
    "titans_mac": dict(num_attention_heads=_heads_of(64), titans_chunk_size=64, titans_memory_depth=2,
                       titans_segment_size=512, num_persistent_tokens=16),
    "titans_mag": dict(num_attention_heads=_heads_of(64), titans_chunk_size=64, titans_memory_depth=2,
                       attention_window=1024, num_persistent_tokens=16),
    "titans_mal": dict(num_attention_heads=_heads_of(64), titans_chunk_size=64, titans_memory_depth=2,
                       attention_window=1024, num_persistent_tokens=16),
    # LaCT's LM configs (lact_llm/configs/760M_*.json): 64-dim attention heads, 4 fast-weight heads,
    # 2048-token chunks and window, RoPE base 1e6, momentum, Muon variant
    # Miras (no official code; [sec] unverified): 64-dim heads, 2-layer MLP memory ×4, chunks of 16
    "moneta": dict(num_attention_heads=_heads_of(64), miras_chunk_size=16, miras_memory_expansion=4),
    "yaad": dict(num_attention_heads=_heads_of(64), miras_chunk_size=16, miras_memory_expansion=4),
    "memora": dict(num_attention_heads=_heads_of(64), miras_chunk_size=16, miras_memory_expansion=4),
    # ATLAS (no official code): 32-dim heads keep the degree-2 features at 560 per head; window 8, Muon
    "atlas": dict(num_attention_heads=_heads_of(32), atlas_chunk_size=16, atlas_window=8, atlas_poly_degree=2,
                  atlas_memory_expansion=2, inner_optimizer="muon"),
    "lact": dict(num_attention_heads=_heads_of(64), lact_num_heads=4, lact_chunk_size=2048, attention_window=2048,
                 attention_rope_theta=1e6, lact_base_lr=1e-3, lact_momentum=True, inner_optimizer="muon"),
    # TNT (no official code): Titans memories (64-wide heads, depth 2); stage-1 sizes — a global chunk
    # of 512 (so a 2K-token sequence has 4 global updates), two local memories with chunks 32 and 64,
    # reset with the global chunk. Stage 2 fine-tunes with e.g. tnt_local_chunk_sizes=[8, 16].
    "tnt": dict(num_attention_heads=_heads_of(64), titans_memory_depth=2, tnt_global_chunk_size=512,
                tnt_local_chunk_sizes=[32, 64], tnt_reset_period=None),
    # Hope (no official code): 64-wide heads, chunk 16, three CMS levels; the CMS levels (2·C² each)
    # take the place of most of the SwiGLU MLP: intermediate size reduced by 5·C/3 to match Titans
    "hope": dict(num_attention_heads=_heads_of(64), hope_chunk_size=16, hope_cms_chunk_sizes=[128, 512, 2048],
                 intermediate_size=lambda p: 8 * round((p["intermediate_size"] - 5 * p["hidden_size"] / 3) / 8)),
}


# at ``tiny`` (trained on 512-token sequences, docs/benchmarks.md "Training quality"): every part of
# each layer must update inside a sequence, so the paper sizes' 2048-token chunks are scaled down;
# ATLAS keeps 32-wide heads (64-wide ones make its degree-2 features 2,145 wide: > 20 GB at this size)
SMALL_FAMILY_DEFAULTS: dict[str, dict] = {
    "lact": dict(lact_chunk_size=128, attention_window=128),
    "tnt": dict(tnt_global_chunk_size=128, tnt_local_chunk_sizes=[16, 32], tnt_reset_period=None),
    # Hope's inner losses are summed over the features (as Titans'): at base_lr 0.1 a tiny run went
    # NaN at step 34 (issue 22; gradient norms 25–72 from step 17), at 0.01 it trains smoothly
    "hope": dict(hope_cms_chunk_sizes=[32, 128, 256], hope_base_lr=0.01),
    "atlas": dict(num_attention_heads=_heads_of(32)),
    # MAL's attention reads only the memory's output: a smaller inner step (issue 22, 60 steps: val
    # 6.62 at 0.01, 6.40 at 0.003, attention 6.43)
    "titans_mal": dict(titans_base_lr=0.003),
    # Memora materialises every token's softmax weights ([n, d, E·d] per head and chunk): at E = 4 a
    # step is 27–32× attention's time, at E = 1 2.7–3.3× and it learns (issue 22, 60 steps: val 6.02,
    # attention 6.43); the KL retention and the 2-layer memory stay
    "memora": dict(miras_memory_expansion=1),
}
SMALL_SIZES = ("tiny",)


def preset_config(name: str, **overrides) -> MemoryLMConfig:
    """MemoryLMConfig of a preset, e.g. ``preset_config("125m", memory_layer="ttt_mlp")`` or
    ``preset_config("760m", memory_layer="lact")`` (LaCT's per-size defaults applied)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    base = dict(PRESETS[name])
    table = FAMILY_DEFAULTS if name in PAPER_SIZES else SMALL_FAMILY_DEFAULTS if name in SMALL_SIZES else {}
    family = table.get(overrides.get("memory_layer"), {})
    base.update({k: (v(base) if callable(v) else v) for k, v in family.items()})
    return MemoryLMConfig(**{**base, **overrides})
