"""A training checkpoint → a self-contained Hugging Face folder (weights, config, tokenizer, model code).

    python -m pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--step N] [--dtype float32|bfloat16]
                              [--max-shard-size 5GB] [--overwrite]

RUN_DIR_OR_CHECKPOINT is a run directory (its ``latest`` checkpoint, or ``--step N``) or one
``checkpoints/step_XXXXXXXX`` folder. Any layout the trainer writes is read on one CPU process,
without a process group:

* ZeRO-1/2/3 (TP = 1): DeepSpeed's own consolidation of the fp32 master weights
  (``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``);
* ZeRO-0, and TP > 1 under ZeRO-0/1/2: the module states of every TP rank
  (``mp_rank_XX_model_states.pt``; the trainer keeps parameters in float32, so these are the
  master weights), merged back to single-device names and shapes with the sharding rules of
  ``parallel.tensor`` (:func:`parallel.tensor.tp_layout`: column/row-parallel, vocab-parallel,
  head-sharded and strided tensors);
* CP shards nothing (every CP rank holds the same weights).

OUT_DIR gets ``config.json``, ``model.safetensors`` (sharded with an index past
``--max-shard-size``), ``generation_config.json``, the model code (``trust_remote_code=True``)
and, when the run had a tokenizer, the sentencepiece model as an HF tokenizer. It is written
under a temporary name and renamed when complete; a non-empty OUT_DIR is only replaced with
``--overwrite``. Bad input is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError
from pretrain.safe_files import UnsafeFileError, torch_load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# one module-states file per TP rank: mp_rank_XX_… (ZeRO-0/1/2) or zero_pp_rank_0_mp_rank_XX_… (ZeRO-3)
_MP_RE = re.compile(r"^(?:zero_pp_rank_0_)?mp_rank_(\d+)_model_states\.pt$")


class ExportError(Exception):
    """Input that cannot be exported; printed as one error line."""


# ------------------------------------------------------------------------------------ finding
def locate(path: str | Path, step: int | None = None) -> tuple[Path, Path, dict]:
    """(run_dir, checkpoint folder, manifest) of a run directory or a checkpoint folder, size-checked."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if (path / checkpoint.MANIFEST).is_file() or re.match(r"^step_\d{8}$", path.name):
        if step is not None and path.name != checkpoint.tag_for(step):
            raise ExportError(f"--step {step} does not match the checkpoint folder {path.name}")
        folder, run_dir = path, path.parent.parent
        manifest = checkpoint._manifest(folder)
    else:
        run_dir = path
        if step is not None:
            folder = checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step)
            if not folder.is_dir():
                have = sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).glob("step_*"))
                raise ExportError(f"{run_dir} has no checkpoint for step {step}"
                                  + (f" (it has {', '.join(have)})" if have else ""))
            manifest = checkpoint._manifest(folder)
        else:
            found = checkpoint.find_resume(run_dir)
            if found is None:
                raise ExportError(f"no checkpoint in {path} (expected a run directory with checkpoints/ "
                                  "or a checkpoints/step_XXXXXXXX folder)")
            folder, manifest = found
    if not (run_dir / "model_config.json").is_file():
        raise ExportError(f"{run_dir} has no model_config.json (is {path} inside a run directory of pretrain.train?)")
    return run_dir, folder, manifest


# --------------------------------------------------------------------------------- consolidating
def _load(path: Path) -> dict:
    """A DeepSpeed file, unpickling nothing beyond tensors and DeepSpeed's checkpoint types."""
    try:
        return torch_load(path)
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None


def _module_states(folder: Path) -> list[dict]:
    """Every TP rank's ``mp_rank_XX_model_states.pt``, in rank order; the TP size they were saved with is checked."""
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _MP_RE.match(p.name))}
    ranks = sorted(files)
    if not ranks:
        raise CheckpointError(f"checkpoint {folder} has no mp_rank_XX_model_states.pt (not a checkpoint of pretrain.train?)")
    states = [_load(files[r]) for r in ranks]
    tp = states[0].get("mp_world_size", 1) or 1
    if ranks != list(range(tp)):
        raise CheckpointError(f"checkpoint {folder} was saved with TP size {tp} but has the module states of "
                              f"TP ranks {ranks}")
    return states


def consolidate(folder: Path, mcfg) -> tuple[dict, dict]:
    """The single-device float32 state_dict of the checkpoint and a summary {tp, zero_stage}."""
    states = _module_states(folder)
    tp = len(states)
    zero_stage = int(states[0].get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if zero_stage >= 1 and tp == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            full = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        except (FileNotFoundError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise CheckpointError(f"DeepSpeed cannot consolidate the ZeRO-{zero_stage} checkpoint {folder}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return dict(full), {"tp": tp, "zero_stage": zero_stage}
    if zero_stage == 3:
        raise CheckpointError(f"checkpoint {folder}: ZeRO-3 with TP {tp} is not supported by the trainer or the exporter")
    modules = [{k: v for k, v in s["module"].items() if not k.endswith("_extra_state")} for s in states]
    if tp == 1:
        return modules[0], {"tp": 1, "zero_stage": zero_stage}
    from models import MemoryLMForCausalLM
    from parallel.tensor import tp_layout, unshard

    with torch.device("meta"):
        layout = tp_layout(MemoryLMForCausalLM(mcfg), tp)
    full = {}
    for name, t in modules[0].items():
        if name in layout:
            dim, stride = layout[name]
            full[name] = unshard([m[name] for m in modules], dim, stride)
        else:
            full[name] = t
    return full, {"tp": tp, "zero_stage": zero_stage}


# ------------------------------------------------------------------------------------- export
def export(src: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "float32",
           max_shard_size: str = "5GB", overwrite: bool = False) -> dict:
    """Writes the HF folder; returns a summary (step, tp, zero_stage, files)."""
    from models import MemoryLMConfig, MemoryLMForCausalLM
    from models.hf_folder import atomic_output_dir, save_model_folder

    from transformers.utils.hub import convert_file_size_to_int

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ExportError(f"--max-shard-size must be a size like 5GB or 500MB, got {max_shard_size!r}") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    run_dir, folder, manifest = locate(src, step)
    checkpoint.verify_crcs(folder, manifest)
    mcfg = MemoryLMConfig.from_json_file(run_dir / "model_config.json")
    full, info = consolidate(folder, mcfg)
    train_cfg = run_dir / "config.json"
    if train_cfg.is_file():
        saved_tp = int(json.loads(train_cfg.read_text(encoding="utf-8")).get("tp", 1))
        if saved_tp != info["tp"]:
            raise ExportError(f"TP size mismatch: {train_cfg} says --tp {saved_tp}, but checkpoint {folder} holds "
                              f"the shards of {info['tp']} TP rank(s)")
    model = MemoryLMForCausalLM(mcfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match model_config.json: "
                              + (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "")
                              + (f"unexpected {unexpected[:3]}" if unexpected else ""))
    for name, t in expected.items():
        if tuple(full[name].shape) != tuple(t.shape):
            raise ExportError(f"TP size mismatch: {name} merged from {info['tp']} TP rank(s) has shape "
                              f"{tuple(full[name].shape)}, the model needs {tuple(t.shape)}")
    model.load_state_dict({k: full[k].to(t.dtype) for k, t in expected.items()}, strict=True)
    model = model.eval().to(DTYPES[dtype])
    model.config.use_cache = True
    tokenizer = run_dir / "tokenizer.model"
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_model_folder(model, tmp, max_shard_size=max_shard_size)
        if not (tmp / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        if tokenizer.is_file():
            from data_pipeline.tokenizer import to_hf_tokenizer

            to_hf_tokenizer(tokenizer, tmp)
    return {"step": int(manifest["step"]), "checkpoint": str(folder), **info, "dtype": dtype,
            "tokenizer": tokenizer.is_file(), "files": sorted(p.name for p in out_dir.iterdir())}


# ---------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line, exit 2 (like the trainer)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("src", metavar="RUN_DIR_OR_CHECKPOINT", help="run directory or checkpoints/step_XXXXXXXX folder")
    p.add_argument("out", metavar="OUT_DIR", help="the Hugging Face folder to write")
    p.add_argument("--step", type=int, default=None, help="export this step's checkpoint (default: the latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default="5GB", help="shard model.safetensors past this size (with an index)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (only once the new one is complete)")
    args = p.parse_args(argv)

    from models.hf_folder import FolderError

    try:
        summary = export(args.src, args.out, args.step, args.dtype, args.max_shard_size, args.overwrite)
    except (ExportError, CheckpointError, FolderError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"exported step {summary['step']} (TP {summary['tp']}, ZeRO {summary['zero_stage']}, {summary['dtype']}) "
          f"of {summary['checkpoint']} to {args.out}: {', '.join(summary['files'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
