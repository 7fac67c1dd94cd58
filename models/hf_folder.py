"""Writing self-contained Hugging Face folders: weights, config, and the model code itself.

The model files of this package import only torch, transformers and each other (relative imports), so
writing them next to ``config.json`` (with an ``auto_map``) makes the folder loadable with
``trust_remote_code=True`` where this project is not installed. transformers wants the code flat — one
folder, siblings imported as ``from .name import x`` — so the nested package (common/, ops/<family>/,
layers/, hf/) is written with one flat name per file (``ops/ttt/chunk.py`` → ``ops_ttt_chunk.py``; the
hf/ files keep their names, which ``auto_map`` points at) and every relative import rewritten to it.
"""
from __future__ import annotations

import ast
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .layers.registry import model_files

PACKAGE = Path(__file__).resolve().parent
# The files an exported folder needs: those of every registered layer type and the shared ones
# (models/layers/registry.py), the ViT³ classifier's, and every file they import (package-relative paths).
ROOTS = (*model_files(), "hf/configuration_vit3.py", "hf/modeling_vit3.py", "layers/vit3.py")
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


def flat_name(path: str) -> str:
    """The file's name in an exported folder: ``ops/ttt/chunk.py`` → ``ops_ttt_chunk.py``, ``hf/x.py`` → ``x.py``."""
    return path[len("hf/"):] if path.startswith("hf/") else path.replace("/", "_")


def _relative_imports(path: str, tree: ast.Module):
    """(node, package-relative path of the imported module) of every relative import of ``path``."""
    package = Path(path).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if not node.module:
                raise FolderError(f"models/{path}:{node.lineno}: write `from .module import name` (not "
                                  f"`from . import module`): the flat folder of an export has no packages")
            base = package[: len(package) - node.level + 1]
            yield node, "/".join((*base, *node.module.split("."))) + ".py"


def code_files() -> list[str]:
    """The package-relative paths of every model file an exported folder needs: ``ROOTS`` and, recursively,
    every file they import."""
    todo, seen = list(ROOTS), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [dep for _, dep in _relative_imports(path, ast.parse((PACKAGE / path).read_text()))]
    names = {}
    for path in seen:
        if names.setdefault(flat_name(path), path) != path:
            raise FolderError(f"models/{path} and models/{names[flat_name(path)]} have the same flat name")
    return sorted(seen)


def flat_source(path: str) -> str:
    """The source of ``models/<path>`` with its relative imports rewritten to flat siblings
    (``from ..common.parts import x`` → ``from .common_parts import x``), the form transformers copies."""
    source = (PACKAGE / path).read_text()
    lines = source.splitlines(keepends=True)
    edits = []
    for node, dep in _relative_imports(path, ast.parse(source)):
        names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        indent = lines[node.lineno - 1][: node.col_offset]
        edits.append((node.lineno, node.end_lineno, f"{indent}from .{flat_name(dep)[:-3]} import {names}\n"))
    for first, last, text in sorted(edits, reverse=True):
        lines[first - 1:last] = [text]
    return "".join(lines)


MODEL_CODE_FILES = code_files()


def copy_model_code(out_dir: str | Path) -> None:
    """Writes every model file flat into ``out_dir`` (:func:`flat_name`, :func:`flat_source`)."""
    for path in MODEL_CODE_FILES:
        (Path(out_dir) / flat_name(path)).write_text(flat_source(path))


def save_model_folder(model, out_dir: str | Path, max_shard_size: str = "5GB") -> None:
    """save_pretrained (safetensors) + generation config + the model code with its auto_map."""
    model.config.auto_map = dict(AUTO_MAPS[model.config.model_type])
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    copy_model_code(out_dir)
