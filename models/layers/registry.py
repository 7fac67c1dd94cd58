"""The registry of sequence-mixer types: one :class:`LayerSpec` per ``memory_layer`` / ``layer_pattern``
name, from which everything else derives — configuration validation, ``build_mixer``, the files of an
exported HF folder, the tensor-parallel plan, the context-parallel strategy, FLOPs per token (MFU),
the benchmark list and the tests' parametrisations. Adding a layer: one ops folder (``ops/<family>/``),
one layer module (``layers/<family>.py``) and one ``register_layer(LayerSpec(...))`` entry at the end of
this file (docs/adding_a_layer.md).

Only torch and sibling model files are imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

# `from .module import name` (not `from . import module`): transformers copies exactly the files named
# that way into its remote-code cache (models/hf_folder.py rewrites them to the flat folder's names)
from ..common.attention import AttentionLayer
from ..common.parts import InnerKnobs
from ..ops.atlas.chunk import poly_feature_dim
from .atlas import build_atlas_mixer
from .deltanet import DeltaNetLayer
from .hope import build_hope_mixer
from .kda import build_kda_mixer, kda_flops
from .lact import LaCTLayer
from .miras import build_miras_mixer
from .titans import build_titans_mixer
from .tnt import build_tnt_mixer, check_tnt_sizes
from .ttt import TTTLayer


@dataclass(frozen=True)
class TPPlan:
    """Tensor parallelism by heads as data (interpreted by ``parallel.tensor.apply_tp_plan``); names
    absent from a module are skipped (e.g. the gates of the ungated variant).

    column:  nn.Linear → ColumnParallel (its output rows are laid out head by head)
    convs:   depthwise causal convs whose channels are sharded
    heads:   parameters sharded on dim 0 (per head or per head-major channel)
    shared:  replicated parameters (dotted names) used inside the head-sharded computation: their
             gradient is summed over TP
    row:     nn.Linear → RowParallel (output all-reduced)
    The module's ``num_heads`` is divided by tp and ``hidden_size`` set to ``num_heads·head_dim``."""

    column: tuple[str, ...] = ()
    convs: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    row: tuple[str, ...] = ("o_proj",)


@dataclass(frozen=True)
class ScanHeads:
    """Where the heads are in a mixer's scan, so that the scan runs on a slice of them (``cp_mode="2d"``,
    parallel/context2d.py). One axes string per item of ``prepare``'s tuple before the halo (empty:
    ``"bht"`` for every item; a string covers every tensor of a dict/list item):

    ``"bht"`` [B, H, T, …] · ``"btc"`` [B, T, C], C cut into H channel groups (exchanged as a per-head
    tensor) · ``"bh"`` [B, H, …] and ``"h"`` [H, …]: the same on every token, sliced, not exchanged.
    outputs: the same for ``scan``'s outputs (one string per item of a tuple); params: ``fnmatch``
    patterns of the parameters ``scan`` reads per head (dim 0); heads: the config field holding H.
    Every tensor of the state (``LayerState``'s convention) is [B, H, …]."""

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    heads: str = "num_attention_heads"


CP_STRATEGIES = ("ttt_pass", "generic_pass", "attention")


@dataclass(frozen=True)
class LayerSpec:
    """Everything the project needs to know about one mixer type.

    name:        the ``memory_layer`` / ``layer_pattern`` name
    family:      family tag (TTT: the inner model; the inner optimizers are checked per family)
    build:       ``(config, layer_idx) -> nn.Module`` with ``forward(x, state=None) -> (y, state)``
    files:       the layer's own model files, package-relative (its layer module and ops folder; the
                 shared ones are ``SHARED_FILES``; what they import is exported with them)
    kind:        ``memory`` or ``attention``
    validate:    ``(config) -> None``: raises ValueError (one clear line) for bad settings of this layer
    options:     the layer's own config fields and their defaults (``MemoryLMConfig`` accepts them)
    fast_weights: the rule for the layer's fast weights (its initial θ₀, never weight-decayed, sharded by
                 head): ``"fast_weight_names"`` — the modules that hold them declare that attribute
                 (pretrain/optim.py leaves every direct parameter of such a module undecayed, and every
                 1-D parameter anywhere), or ``"none"`` for a layer whose state starts at zero
    tp:          :class:`TPPlan`, or the name of a plan function of ``parallel/tensor.py``
    tp_divisible: config fields that tp must divide (besides the heads)
    cp:          context-parallel strategy: ``ttt_pass`` (scan-level state pass), ``generic_pass``
                 (state pass around the mixer call) or ``attention`` (all-gather / halo)
    prefix:      the state update is affine in the state: ``cp_mode="prefix"`` applies
    ulysses:     ``cp_mode="ulysses"`` (head all-to-all) applies
    flops:       ``(config, seq_len) -> float``: forward FLOPs per token of the sequence mixing
                 (everything but the layer's nn.Linear and conv layers, which are counted apart)
    heads_independent: heads do not interact inside the scan (TP by heads needs no exchange there)
    scan_heads:  :class:`ScanHeads` (the scan runs on any slice of the heads: ``cp_mode="2d"``), or a
                 sentence saying why it cannot (2-D CP refuses the layer with it)
    inner_knobs: the inner-loop knobs the layer takes (keys of ``INNER_KNOB_LAYERS``)
    inner_optimizers: accepted ``inner_optimizer`` values, the first the default (empty = fixed)
    chunk_options: config fields that ``bench.layer --chunk`` sets; the first is also the unit of scan
                 checkpointing (``scan_checkpoint_group_size`` of these chunks per recomputed piece,
                 :func:`checkpoint_span`; none: the layer checkpoints inside its own scan, as TTT, or
                 has no scan)
    test_config: config overrides for tiny test models (chunks that end inside 20-token sequences)
    """

    name: str
    family: str
    build: Callable[[object, int], nn.Module]
    files: tuple[str, ...]
    flops: Callable[[object, int], float]
    kind: str = "memory"
    validate: Callable[[object], None] | None = None
    options: dict = field(default_factory=dict)
    fast_weights: str = "fast_weight_names"
    tp: TPPlan | str = TPPlan()
    tp_divisible: tuple[str, ...] = ()
    cp: str = "generic_pass"
    prefix: bool = False
    ulysses: bool = False
    heads_independent: bool = True
    scan_heads: ScanHeads | str = ScanHeads()
    inner_knobs: tuple[str, ...] = ()
    inner_optimizers: tuple[str, ...] = ()
    chunk_options: tuple[str, ...] = ()
    test_config: dict = field(default_factory=dict)


LAYERS: dict[str, LayerSpec] = {}
# model files every exported folder needs whatever its layers (the HF config/model, shared parts)
SHARED_FILES = ("hf/configuration_memory.py", "hf/modeling_memory.py", "layers/registry.py")


def register_layer(spec: LayerSpec) -> LayerSpec:
    if spec.name in LAYERS:
        raise ValueError(f"layer type {spec.name!r} is already registered")
    if spec.kind not in ("memory", "attention") or spec.cp not in CP_STRATEGIES:
        raise ValueError(f"layer {spec.name!r}: kind must be memory/attention and cp one of {CP_STRATEGIES}")
    LAYERS[spec.name] = spec
    return spec


def layer_spec(name: str) -> LayerSpec:
    if name not in LAYERS:
        raise ValueError(f"unknown layer type {name!r}; expected one of {sorted(LAYERS)}")
    return LAYERS[name]


def ops_files(family: str, *names: str) -> tuple[str, ...]:
    """Package-relative paths of files of ``ops/<family>/``."""
    return tuple(f"ops/{family}/{name}.py" for name in names)


def model_files() -> list[str]:
    """The model files of every registered layer and the shared ones (package-relative), sorted."""
    return sorted({*SHARED_FILES, *(f for s in LAYERS.values() for f in s.files)})


def checkpoint_span(spec: LayerSpec, config) -> int:
    """Tokens per recomputed piece of a mixer (``Mixer.checkpoint_tokens``): ``scan_checkpoint_group_size``
    of its chunks (the largest, for a list of chunk sizes), 0 = off."""
    group = int(getattr(config, "scan_checkpoint_group_size", 0) or 0)
    if not group or not spec.chunk_options:
        return 0
    chunk = getattr(config, spec.chunk_options[0])
    return group * int(max(chunk) if isinstance(chunk, (list, tuple)) else chunk)


def registered_options() -> dict:
    """The registered layers' own config fields and their defaults."""
    return {k: v for s in LAYERS.values() for k, v in s.options.items()}


def mean_context(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query sees: mean over t = 1..T of min(t, window)."""
    T = seq_len
    w = T if window is None else min(window, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def _positive(config, *names) -> None:
    for name in names:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name} must be ≥ 1, got {getattr(config, name)}")


def _attn_rope(config) -> float:
    return config.attention_rope_theta if config.attention_rope_theta is not None else config.rope_theta


def _dims(config):
    C, H = config.hidden_size, config.num_attention_heads
    return C, H, C // H


# ---------------------------------------------------------------------------------------------- TTT
def _build_ttt(config, layer_idx):
    return TTTLayer(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                        inner=LAYERS[config.mixer_types[layer_idx]].family, mini_batch_size=config.mini_batch_size,
                        base_lr=config.ttt_base_lr, rope_theta=config.rope_theta, share_qk=config.share_qk,
                        conv_kernel=config.conv_kernel, use_gate=config.use_gate,
                        inner_expansion=config.inner_expansion,
                        scan_checkpoint_group_size=config.scan_checkpoint_group_size, scan_impl=config.scan_impl,
                        knobs=InnerKnobs.from_config(config))


def _no_steps_with_pull(config) -> None:
    if int(config.inner_steps) > 1 and config.inner_init_pull:
        raise ValueError("inner_steps > 1 with inner_init_pull is not supported by TTT and Titans (the pull at "
                         "each token's own iterate has no dual form here); use one of them")


def _flops_ttt_linear(config, seq_len):
    _, H, d = _dims(config)
    b = min(config.mini_batch_size, seq_len)
    return H * (6 * d * d + 4 * b * d)


def _flops_ttt_mlp(config, seq_len):
    _, H, d = _dims(config)
    b, m = min(config.mini_batch_size, seq_len), config.inner_expansion * d
    return H * (14 * d * m + 4 * b * (d + m))


_TTT_FILES = ("layers/ttt.py", *ops_files("ttt", "naive", "chunk", "fused", "knobs", "triton", "triton_kernels"))
_ALL_KNOBS = ("inner_grad_clip", "inner_init_pull", "inner_lr_schedule", "inner_loss=mse", "inner_loss=next_token")
for _name, _inner, _flops in (("ttt_linear", "linear", _flops_ttt_linear), ("ttt_mlp", "mlp", _flops_ttt_mlp)):
    register_layer(LayerSpec(
        _name, _inner, _build_ttt, _TTT_FILES, _flops, validate=_no_steps_with_pull, tp="tp_ttt_layer",
        cp="ttt_pass", ulysses=True, inner_knobs=("inner_steps", *_ALL_KNOBS, "inner_loss=ln_recon"),
        scan_heads=ScanHeads(params=("ttt_norm_weight", "ttt_norm_bias")),
        chunk_options=(), test_config=dict(mini_batch_size=4)))


# ------------------------------------------------------------------------------ (Gated) DeltaNet
def _build_deltanet(config, layer_idx):
    return DeltaNetLayer(config.hidden_size, config.num_attention_heads,
                                  gated=config.mixer_types[layer_idx] == "gated_deltanet",
                                  chunk_size=config.deltanet_chunk_size, conv_kernel=config.conv_kernel,
                                  norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl,
                                  knobs=InnerKnobs.from_config(config))


def _validate_deltanet(config) -> None:
    _positive(config, "deltanet_chunk_size")
    if config.inner_init_pull >= 1:
        raise ValueError(f"inner_init_pull must be < 1 for (gated) DeltaNet (its pull is a decay 1 − β·λ > 0), "
                         f"got {config.inner_init_pull}")


def _flops_deltanet(config, seq_len):
    _, H, d = _dims(config)
    c = min(config.deltanet_chunk_size, seq_len)
    return H * (6 * d * d + 4 * c * d)  # q·h, W·h, the state update; intra-chunk QKᵀ and A(U − Wh)


for _name in ("deltanet", "gated_deltanet"):
    register_layer(LayerSpec(
        _name, _name, _build_deltanet, ("layers/deltanet.py", *ops_files("delta_rule", "naive", "chunk", "knobs")),
        _flops_deltanet, validate=_validate_deltanet, fast_weights="none",
        tp=TPPlan(column=("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"),
                  convs=("conv_q", "conv_k", "conv_v"), heads=("A_log", "dt_bias"), shared=("o_norm.weight",)),
        prefix=True, inner_knobs=("inner_steps", "inner_init_pull", "inner_lr_schedule", "inner_loss=mse",
                                  "inner_loss=next_token"),
        chunk_options=("deltanet_chunk_size",), test_config=dict(deltanet_chunk_size=4)))


# ------------------------------------------------------------------------------------------ Titans
def _build_titans(config, layer_idx):
    return build_titans_mixer(config, config.mixer_types[layer_idx], _attn_rope(config))


def _validate_titans(config) -> None:
    _positive(config, "titans_chunk_size", "titans_memory_depth", "titans_memory_expansion", "titans_segment_size")
    _no_steps_with_pull(config)


def _validate_titans_mac(config) -> None:
    _validate_titans(config)
    if config.titans_segment_size % config.titans_chunk_size:
        raise ValueError(f"titans_segment_size {config.titans_segment_size} must be a multiple of titans_chunk_size "
                         f"{config.titans_chunk_size} (MAC updates the memory once per segment)")


def _titans_memory_params(config) -> int:
    _, _, d = _dims(config)
    e, depth = config.titans_memory_expansion * d, config.titans_memory_depth
    return d * d if depth == 1 else 2 * d * e + (depth - 2) * e * e


def _titans_flops_of(kind):
    """Memory forward at the chunk's weights (2P), its gradient (4P), the read (2P), momentum/decay
    scans (4P), P the memory MLP's parameters per head; plus the block's attention."""

    def flops(config, seq_len):
        C, H, _ = _dims(config)
        mem = H * 12 * _titans_memory_params(config)
        if kind == "titans":
            return mem
        window = (config.titans_segment_size + config.num_persistent_tokens if kind == "titans_mac"
                  else config.attention_window)
        return mem + 4 * C * mean_context(seq_len, window)

    return flops


_TITANS_HEADS = {  # MAG's attention output passes through its scan; MAL's and MAC's scans mix the heads
    "titans": ScanHeads(), "titans_mag": ScanHeads(inputs=("bht",) * 6 + ("btc",), outputs=("bht", "btc")),
    "titans_mal": "its scan runs the memory's output projection (all heads) and the attention on it",
    "titans_mac": "its scan runs each segment's attention and output projection (all heads) before the memory"}
_TITANS_FILES = ("layers/titans.py",
                 *ops_files("titans", "naive", "chunk", "fused", "knobs", "triton", "triton_kernels"))
for _name in ("titans", "titans_mac", "titans_mag", "titans_mal"):
    register_layer(LayerSpec(
        _name, "titans", _build_titans, _TITANS_FILES, _titans_flops_of(_name),
        validate=_validate_titans_mac if _name == "titans_mac" else _validate_titans,
        tp="tp_titans_memory" if _name == "titans" else "tp_titans_block",
        inner_knobs=("inner_steps", *_ALL_KNOBS), inner_optimizers=("momentum", "sgd"),
        chunk_options=("titans_chunk_size",), scan_heads=_TITANS_HEADS[_name],
        test_config=dict(titans_chunk_size=4, titans_segment_size=8, attention_window=5, num_persistent_tokens=2)))


# ------------------------------------------------------------------------ Miras (Moneta, Yaad, Memora)
def _build_miras(config, layer_idx):
    return build_miras_mixer(config, config.mixer_types[layer_idx])


def _validate_miras(config) -> None:
    _positive(config, "miras_chunk_size", "miras_memory_expansion")
    if config.miras_base_lr <= 0:
        raise ValueError(f"miras_base_lr must be > 0, got {config.miras_base_lr}")
    if config.miras_p < 1:
        raise ValueError(f"miras_p must be ≥ 1 (Moneta's ℓ_p attentional bias), got {config.miras_p}")
    if config.miras_q < 2:
        raise ValueError(f"miras_q must be ≥ 2 (Moneta's ℓ_q retention), got {config.miras_q}")


def _miras_flops_of(kind):
    def flops(config, seq_len):
        _, H, d = _dims(config)
        e, b = config.miras_memory_expansion * d, min(config.miras_chunk_size, seq_len)
        P = 2 * d * e
        if kind == "memora":  # forward + gradient at the chunk start (6P), per-token logits (2bP), softmax (≈5P), read (2P)
            return H * (13 + 2 * b) * P
        # forward + gradient at the chunk start (6P), dual-form read (2P + 4b(d + e)), chunk-end update (2P)
        return H * (10 * P + 4 * b * (d + e))

    return flops


for _name in ("moneta", "yaad", "memora"):
    register_layer(LayerSpec(
        _name, "miras", _build_miras, ("layers/miras.py", *ops_files("miras", "naive", "chunk")),
        _miras_flops_of(_name), validate=_validate_miras,
        tp="tp_miras_atlas", chunk_options=("miras_chunk_size",), test_config=dict(miras_chunk_size=4),
        scan_heads=ScanHeads(inputs=("bht",) * 4 + ("bh", "bh"))))


# ------------------------------------------------------------------------------------------- ATLAS
def _validate_atlas(config) -> None:
    _positive(config, "atlas_chunk_size", "atlas_window", "atlas_poly_degree", "atlas_memory_expansion")
    if config.atlas_poly_degree > 4:
        raise ValueError(f"atlas_poly_degree must be ≤ 4 (the features grow as head_dim^degree), "
                         f"got {config.atlas_poly_degree}")
    if config.atlas_base_lr is not None and config.atlas_base_lr <= 0:
        raise ValueError(f"atlas_base_lr must be > 0, got {config.atlas_base_lr}")


def _flops_atlas(config, seq_len):
    _, H, d = _dims(config)
    D, e = poly_feature_dim(d, config.atlas_poly_degree), config.atlas_memory_expansion * d
    b, c = min(config.atlas_chunk_size, seq_len), config.atlas_window
    P = D * e + e * d
    grads = 6 * P * (1 + (c - 1) / b)  # the window's earlier tokens are differentiated again at each chunk start
    if (config.inner_optimizer or "muon") == "muon":  # per-token S_t (2(b+c−1)P), Newton–Schulz, M_t (2bP), read
        ns = sum(5 * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3) for m, n in ((D, e), (e, d)))
        return H * (grads + 2 * (b + c - 1) * P + ns + 2 * b * P + 2 * P)
    return H * (grads + 4 * P + 4 * b * (D + 2 * e + d))  # dual-form read and chunk-end update


register_layer(LayerSpec(
    "atlas", "atlas", lambda config, layer_idx: build_atlas_mixer(config),
    ("layers/atlas.py", *ops_files("atlas", "naive", "chunk")),
    _flops_atlas, validate=_validate_atlas, tp="tp_miras_atlas", inner_optimizers=("muon", "momentum", "sgd"),
    chunk_options=("atlas_chunk_size",), test_config=dict(atlas_chunk_size=4, atlas_window=3)))


# -------------------------------------------------------------------------------------------- LaCT
def _build_lact(config, layer_idx):
    return LaCTLayer(config.hidden_size, config.num_attention_heads, num_lact_heads=config.lact_num_heads,
                          chunk_size=config.lact_chunk_size, window=config.attention_window,
                          inter_multi=config.lact_inter_multi, base_lr=config.lact_base_lr,
                          optimizer=config.inner_optimizer or "muon", momentum=config.lact_momentum,
                          rope_theta=_attn_rope(config), norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl,
                          knobs=InnerKnobs.from_config(config))


def _validate_lact(config) -> None:
    _positive(config, "lact_chunk_size", "lact_num_heads", "lact_inter_multi")
    if config.hidden_size % config.lact_num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by lact_num_heads {config.lact_num_heads}")
    if config.lact_base_lr <= 0:
        raise ValueError(f"lact_base_lr must be > 0, got {config.lact_base_lr}")


def _flops_lact(config, seq_len):
    C = config.hidden_size
    dl = C // config.lact_num_heads
    dh = dl * config.lact_inter_multi
    # LaCT's own count per fast-weight head: 4 (apply to keys) + 8 (gradient) + 6 (apply to queries) × d·d_h
    return config.lact_num_heads * 18 * dl * dh + 4 * C * mean_context(seq_len, config.attention_window)


register_layer(LayerSpec(
    "lact", "lact", _build_lact,
    ("layers/lact.py", *ops_files("lact", "naive", "chunk", "knobs", "triton", "triton_kernels")),
    _flops_lact, validate=_validate_lact, tp="tp_lact", tp_divisible=("lact_num_heads",),
    inner_knobs=_ALL_KNOBS, inner_optimizers=("muon", "sgd"), chunk_options=("lact_chunk_size",),
    scan_heads=ScanHeads(inputs=("bht",) * 7 + ("h", "btc"), outputs=("bht", "btc"), heads="lact_num_heads"),
    test_config=dict(lact_chunk_size=6, lact_num_heads=2, attention_window=5)))


# --------------------------------------------------------------------------------------------- TNT
def _validate_tnt(config) -> None:
    reset = config.tnt_reset_period if config.tnt_reset_period is not None else config.tnt_global_chunk_size
    check_tnt_sizes(config.tnt_global_chunk_size, config.tnt_local_chunk_sizes, reset)


def _flops_tnt(config, seq_len):
    """1 + N Titans memories + the Q-K projection, a linear attention per reset segment."""
    C, H, _ = _dims(config)
    reset = config.tnt_reset_period or config.tnt_global_chunk_size
    return ((1 + len(config.tnt_local_chunk_sizes)) * H * 12 * _titans_memory_params(config)
            + 4 * C * mean_context(seq_len, reset))


register_layer(LayerSpec(
    "tnt", "tnt", lambda config, layer_idx: build_tnt_mixer(config),
    ("layers/tnt.py", *ops_files("tnt", "naive", "chunk")), _flops_tnt,
    validate=_validate_tnt, tp="tp_tnt", inner_optimizers=("momentum", "sgd"),
    chunk_options=("tnt_local_chunk_sizes",), scan_heads=ScanHeads(params=("local*_W*",)),
    test_config=dict(tnt_global_chunk_size=8, tnt_local_chunk_sizes=[2, 4], tnt_reset_period=8)))


# -------------------------------------------------------------------------------------------- Hope
def _validate_hope(config) -> None:
    _positive(config, "hope_chunk_size", "hope_memory_expansion")
    if not config.hope_cms_chunk_sizes or min(config.hope_cms_chunk_sizes) < 1:
        raise ValueError(f"hope_cms_chunk_sizes must be a non-empty list of sizes ≥ 1, got {config.hope_cms_chunk_sizes}")
    if config.hope_base_lr <= 0:
        raise ValueError(f"hope_base_lr must be > 0, got {config.hope_base_lr}")


def _flops_hope(config, seq_len):
    _, H, d = _dims(config)
    e = config.hope_memory_expansion * d
    P, P1 = 2 * d * e, d * e + e  # a d → e → d memory; the lr/decay memories (d → e → 1)
    # key/value/memory: generation (key, value) 4P, targets 6P, gradients 18P, read 2P; lr/decay: 20 P1;
    # each CMS level: read 2P + gradient 4P (its forward is the read)
    return H * (30 * P + 20 * P1 + len(config.hope_cms_chunk_sizes) * 6 * P)


register_layer(LayerSpec(
    "hope", "hope", lambda config, layer_idx: build_hope_mixer(config),
    ("layers/hope.py", *ops_files("hope", "naive", "chunk")),
    _flops_hope, validate=_validate_hope, tp="tp_hope", chunk_options=("hope_chunk_size",),
    scan_heads="its scan runs the output projection (all heads) and the CMS levels on it",
    test_config=dict(hope_chunk_size=4, hope_cms_chunk_sizes=[3, 8])))


# --------------------------------------------------------------------------------------- attention
def _build_attention(config, layer_idx):
    swa = config.mixer_types[layer_idx] == "swa"
    return AttentionLayer(config.hidden_size, config.num_attention_heads,
                                    window=config.attention_window if swa else None, rope_theta=_attn_rope(config))


for _name, _family, _window in (("swa", "sliding_window", True), ("attention", "full", False)):
    register_layer(LayerSpec(
        _name, _family, _build_attention, ("common/attention.py",),
        (lambda config, seq_len: 4 * config.hidden_size * mean_context(seq_len, config.attention_window)) if _window
        else (lambda config, seq_len: 4 * config.hidden_size * mean_context(seq_len, None)),
        kind="attention", fast_weights="none", tp="tp_attention", cp="attention", test_config=dict(attention_window=5)))


# -------------------------------------------------------------------------------- Kimi Delta Attention
register_layer(LayerSpec(
    "kda", "kda", build_kda_mixer, ("layers/kda.py", *ops_files("kda", "naive", "chunk")), kda_flops,
    validate=lambda config: _positive(config, "kda_chunk_size"), options=dict(kda_chunk_size=32), fast_weights="none",
    tp=TPPlan(column=("q_proj", "k_proj", "v_proj", "b_proj", "f_proj", "g_proj"), convs=("conv_q", "conv_k", "conv_v"),
              heads=("A_log", "dt_bias"), shared=("o_norm.weight",)),
    chunk_options=("kda_chunk_size",), test_config=dict(kda_chunk_size=4)))
