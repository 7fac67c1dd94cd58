"""Writing self-contained Hugging Face folders: weights, config, and the model code itself.

The model files of this package import only torch and transformers and use sibling-relative
imports, so copying them next to ``config.json`` (with an ``auto_map``) makes the folder
loadable with ``trust_remote_code=True`` where this project is not installed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .registry import model_files

# The files an exported folder needs (each imports only torch, transformers and its siblings): those
# of every registered layer type and the shared ones (models/registry.py), and the ViT³ classifier's.
MODEL_CODE_FILES = sorted({*model_files(), "configuration_vit3.py", "modeling_vit3.py", "vit3.py"})
AUTO_MAP = {
    "AutoConfig": "configuration_memory.MemoryLMConfig",
    "AutoModel": "modeling_memory.MemoryLMModel",
    "AutoModelForCausalLM": "modeling_memory.MemoryLMForCausalLM",
}
# config.model_type → its auto_map (the ViT³ image classifier beside the language model)
AUTO_MAPS = {
    "memory_lm": AUTO_MAP,
    "vit3": {
        "AutoConfig": "configuration_vit3.ViT3Config",
        "AutoModel": "modeling_vit3.ViT3Model",
        "AutoModelForImageClassification": "modeling_vit3.ViT3ForImageClassification",
    },
}


class FolderError(Exception):
    """The output folder cannot be written as asked."""


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False):
    """Yields a temporary sibling of ``dst``; renames it to ``dst`` only if the block succeeds.

    An existing non-empty ``dst`` is an error unless ``overwrite``; then it is swapped out only
    after the new folder is complete, so a failure never leaves ``dst`` half-written or lost.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FolderError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FolderError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_model_code(out_dir: str | Path) -> None:
    here = Path(__file__).resolve().parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, Path(out_dir) / name)


def save_model_folder(model, out_dir: str | Path, max_shard_size: str = "5GB") -> None:
    """save_pretrained (safetensors) + generation config + the model code with its auto_map."""
    model.config.auto_map = dict(AUTO_MAPS[model.config.model_type])
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    copy_model_code(out_dir)
