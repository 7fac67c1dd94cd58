"""Convert an official ttt-lm-pytorch checkpoint folder into a Hugging Face folder of this project.

    python -m models.convert_official SRC DST [--overwrite] [--dtype float32|bfloat16]

SRC holds the official ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``;
``lm_head`` may be tied and absent). DST gets ``config.json``, ``model.safetensors``,
``generation_config.json`` and this project's model code, so that
``AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)`` needs only torch and
transformers. DST is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .hf.configuration_memory import MemoryLMConfig
from .hf_folder import FolderError, atomic_output_dir, save_model_folder

# Defaults of the official TTTConfig, for keys an official config.json may omit.
OFFICIAL_DEFAULTS = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, pad_token_id=None, tie_word_embeddings=True, rope_theta=10000.0, use_gate=False, share_qk=False,
    ttt_layer_type="linear", ttt_base_lr=1.0, mini_batch_size=16, pre_conv=False, conv_kernel=4,
    scan_checkpoint_group_size=0,
)
SHARED_KEYS = [k for k in OFFICIAL_DEFAULTS if k != "ttt_layer_type"]

# official name (inside model.layers.N.) -> ours; None marks a reshape handled below
LAYER_RENAMES = {
    "seq_norm.weight": "mixer_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "conv.norm.weight": "pre_conv.norm.weight",
    "conv.conv.weight": "pre_conv.conv.weight",
    "conv.conv.bias": "pre_conv.conv.bias",
    "seq_modeling_block.learnable_token_idx": "mixer.token_idx_offset",
    "seq_modeling_block.learnable_ttt_lr_weight": "mixer.lr_gate.weight",  # [H, 1, C] -> [H, C]
    "seq_modeling_block.learnable_ttt_lr_bias": "mixer.lr_gate.bias",  # [H, 1] -> [H]
}
SEQ_BLOCK_PASSTHROUGH = re.compile(
    r"seq_modeling_block\.((?:q|k|v|o|g)_proj\.weight|conv_[qk]\.(?:weight|bias)|ttt_norm_(?:weight|bias)"
    r"|post_norm\.(?:weight|bias)|[Wb][12])$"
)
MLP_PASSTHROUGH = re.compile(r"mlp\.(?:gate|up|down)_proj\.weight$")


class ConversionError(Exception):
    """The source is not a convertible official TTT checkpoint."""


def read_official_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json: not an official ttt-lm-pytorch checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    if raw.get("model_type") == MemoryLMConfig.model_type:
        raise ConversionError(f"{src} is already a converted folder of this project (model_type {raw['model_type']!r})")
    if "ttt_layer_type" not in raw and raw.get("model_type") != "ttt":
        raise ConversionError(f"{path} is not an official TTT config (no 'ttt_layer_type' and model_type is not 'ttt')")
    cfg = {**OFFICIAL_DEFAULTS, **raw}
    if cfg["ttt_layer_type"] not in ("linear", "mlp"):
        raise ConversionError(f"unknown ttt_layer_type {cfg['ttt_layer_type']!r}; expected 'linear' or 'mlp'")
    return cfg


def to_project_config(official: dict) -> MemoryLMConfig:
    kwargs = {k: official[k] for k in SHARED_KEYS}
    try:
        return MemoryLMConfig(memory_layer=f"ttt_{official['ttt_layer_type']}", **kwargs)
    except ValueError as e:
        raise ConversionError(f"invalid official config: {e}") from e


def load_official_weights(src: Path) -> dict[str, torch.Tensor]:
    st, pt = src / "model.safetensors", src / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file
        raise ConversionError(f"cannot read the weights in {src}: {e}") from e
    raise ConversionError(f"{src} has neither model.safetensors nor pytorch_model.bin")


def rename_official(weights: dict[str, torch.Tensor], config: MemoryLMConfig) -> dict[str, torch.Tensor]:
    """Official parameter names/shapes → this project's; unknown names raise ConversionError."""
    out, unexpected = {}, []
    for name, t in weights.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[name] = t
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            unexpected.append(name)
            continue
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in LAYER_RENAMES:
            new = LAYER_RENAMES[rest]
            if new.endswith("lr_gate.weight") or new.endswith("lr_gate.bias"):
                t = t.reshape(t.shape[0], -1).squeeze(-1) if new.endswith("bias") else t.reshape(t.shape[0], -1)
            out[prefix + new] = t
        elif SEQ_BLOCK_PASSTHROUGH.match(rest):
            out[prefix + rest.replace("seq_modeling_block.", "mixer.")] = t
        elif MLP_PASSTHROUGH.match(rest):
            out[prefix + rest] = t
        else:
            unexpected.append(name)
    if unexpected:
        raise ConversionError(f"unexpected tensors in the official checkpoint: {', '.join(sorted(unexpected)[:8])}"
                              + (" …" if len(unexpected) > 8 else ""))
    if "lm_head.weight" not in out and config.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def build_model(src: Path, dtype: torch.dtype = torch.float32):
    """Loads an official folder as this project's MemoryLMForCausalLM (strict: every tensor accounted for)."""
    from .hf.modeling_memory import MemoryLMForCausalLM

    config = to_project_config(read_official_config(src))
    state = rename_official(load_official_weights(src), config)
    model = MemoryLMForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConversionError(
            "checkpoint does not match its config: "
            + (f"missing {', '.join(missing[:8])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(extra[:8])}" if extra else "")
        )
    bad = [n for n in expected if tuple(expected[n].shape) != tuple(state[n].shape)]
    if bad:
        n = bad[0]
        raise ConversionError(f"shape mismatch for {n}: checkpoint {tuple(state[n].shape)} vs config {tuple(expected[n].shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def convert(src: str | Path, dst: str | Path, overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory")
    model = build_model(src, dtype)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        save_model_folder(model, tmp)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.convert_official", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official ttt-lm-pytorch checkpoint folder (config.json + weights)")
    parser.add_argument("dst", help="output Hugging Face folder")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, overwrite=args.overwrite, dtype=getattr(torch, args.dtype))
    except (ConversionError, FolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
