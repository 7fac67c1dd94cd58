"""Atomic, verifiable training checkpoints: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` + ``latest``.

A checkpoint holds DeepSpeed's own files (module, ZeRO-partitioned optimizer, LR scheduler),
``trainer_state.json`` (step, tokens seen, data-loader position, the configuration), one
``rng_rankNNNNN.safetensors`` per process (python, numpy, torch CPU and CUDA generators) and, when
the trainer carries the memory state across steps (``--reset never``), one ``memory_rankNNNNN.safetensors``.
Nothing is unpickled on load beyond tensors and DeepSpeed's few checkpoint types (``safe_files``).

How a save stays atomic (a crash at any moment never leaves a checkpoint that looks complete):
1. every rank writes into ``checkpoints/.tmp-step_X/step_X/`` (a name that is never loaded);
2. the files are fsynced; each rank CRC32s a share of them and rank 0 writes ``manifest.json``
   (every file with its size and CRC) last, and fsyncs it;
3. rank 0 renames the folder to ``checkpoints/step_X`` (atomic on POSIX) and fsyncs the parent;
4. rank 0 replaces ``latest`` (write ``latest.tmp``, fsync, rename, fsync the folder);
5. older checkpoints beyond ``keep`` and stale ``.tmp-*`` folders are removed.
Loading checks ``latest`` → folder → manifest → every file's size (cheap, before any process
group exists) and then every CRC (shared among the ranks), and only then reads anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError

from pretrain.safe_files import (UnsafeFileError, guard_deepspeed_loads, load_tree, rng_tree, save_tree, set_rng_tree,
                                 torch_load)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, partial, corrupt); printed as one error line."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


# ------------------------------------------------------------------------------- small helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not fsync directories
        pass


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def crc32_file(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _shared_crcs(folder: Path, names: list[str]) -> dict[str, int]:
    """CRC32 of every file, the work split round-robin over the ranks, gathered on every rank."""
    rank, world = _world()
    mine = {n: crc32_file(folder / n) for n in names[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = {}
    for p in parts:
        out.update(p)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------- finding
def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is partial: it has no {MANIFEST} "
                              "(a save was interrupted or files were removed); delete it or point 'latest' elsewhere")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {folder} is corrupt: {MANIFEST} is unreadable") from None
    for name, meta in files.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder} is partial: {name} is missing")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"the manifest says {meta['size']}")
    return manifest


def find_resume(run_dir: str | Path) -> tuple[Path, dict] | None:
    """(folder, manifest) of the checkpoint that ``latest`` names, size-checked; None for a new run.

    Cheap and local: safe to call on every rank before the process group exists.
    """
    ckdir = checkpoints_dir(run_dir)
    latest = ckdir / LATEST
    if not latest.exists():
        complete = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and _TAG_RE.match(p.name)) if ckdir.is_dir() else []
        if complete:  # a crash between publishing a folder and updating 'latest'
            folder = complete[-1]
            return folder, _manifest(folder)
        return None
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{latest} is unreadable ({exc})") from None
    if not _TAG_RE.match(tag):
        raise CheckpointError(f"{latest} is corrupt: it should name a checkpoint like step_00000100, holds {tag[:40]!r}")
    folder = ckdir / tag
    if not folder.is_dir():
        raise CheckpointError(f"{latest} points to {tag}, which does not exist in {ckdir}")
    return folder, _manifest(folder)


def read_trainer_state(folder: Path) -> dict:
    """A checkpoint's ``trainer_state.json`` (step, tokens, data position, the settings it was trained with)."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
        if not isinstance(state.get("config"), dict):
            raise ValueError("no 'config'")
        return state
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {TRAINER_STATE} is unreadable ({exc})") from None


def verify_crcs(folder: Path, manifest: dict) -> None:
    """Every file's CRC32 against the manifest (collective: the ranks share the work)."""
    names = sorted(manifest["files"])
    crcs = _shared_crcs(folder, names)
    bad = [n for n in names if crcs[n] != manifest["files"][n]["crc32"]]
    if bad:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {bad[0]} does not match its checksum"
                              + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""))


# -------------------------------------------------------------------------------------- saving
def save(engine, run_dir: str | Path, step: int, trainer_state: dict, keep: int = 0, local_rank: int = 0,
         before_publish=None, memory_state=None) -> Path:
    """Collective: every rank calls it. Returns the published folder. ``memory_state``: this rank's
    carried memory state (tensors in containers and the model's state dataclasses), saved beside its RNG state;
    a full disk or another write error is a CheckpointError, leaving no temporary folder behind."""
    rank, world = _world()
    ckdir = checkpoints_dir(run_dir)
    tmp_root = ckdir / f".tmp-{tag_for(step)}"
    try:
        return _save(engine, ckdir, tmp_root, step, trainer_state, keep, local_rank, before_publish, memory_state,
                     rank, world)
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, quota, I/O error (torch wraps them)
        if isinstance(exc, RuntimeError) and "writ" not in str(exc).lower():
            raise
        shutil.rmtree(tmp_root, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise CheckpointError(f"cannot save the checkpoint of step {step} in {ckdir}: {reason}; the previous "
                              "checkpoint is kept (free space and re-run to resume from it)") from None


def _save(engine, ckdir, tmp_root, step, trainer_state, keep, local_rank, before_publish, memory_state, rank, world):
    tag = tag_for(step)
    if rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, client_state={"step": step}, save_latest=False)
    folder = tmp_root / tag
    folder.mkdir(parents=True, exist_ok=True)
    save_tree(rng_tree(), folder / f"rng_rank{rank:05d}.safetensors")
    if memory_state is not None:
        save_tree(memory_state, folder / f"memory_rank{rank:05d}.safetensors")
    if rank == 0:
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, default=int), encoding="utf-8")
    _barrier()
    if local_rank == 0:  # one process per node flushes what that node wrote
        for name in _files(folder):
            _fsync_file(folder / name)
    _barrier()
    names = _files(folder)
    crcs = _shared_crcs(folder, names)
    if before_publish is not None:  # test hook: a crash here must leave nothing that looks complete
        before_publish()
    final = ckdir / tag
    if rank == 0:
        files = {n: {"size": (folder / n).stat().st_size, "crc32": crcs[n]} for n in names}
        manifest = {"step": step, "tag": tag, "world_size": world, "files": files}
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # e.g. re-saving a step after a resume; swap only once the new one is whole
            old = ckdir / f".old-{tag}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(folder, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(folder, final)
        _fsync_dir(ckdir)
        write_text_atomic(ckdir / LATEST, tag + "\n")
        shutil.rmtree(tmp_root, ignore_errors=True)
        _prune(ckdir, keep, current=tag)
    _barrier()
    return final


def _prune(ckdir: Path, keep: int, current: str) -> None:
    for stale in [*ckdir.glob(".tmp-step_*"), *ckdir.glob(".old-step_*")]:  # left by a crash or a full disk
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and _TAG_RE.match(p.name) and p.name <= current)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- loading
def load_memory_state(folder: Path, manifest: dict):
    """This rank's carried memory state from a checkpoint, or None if it has none or was saved by
    another number of processes (rows then belong to other ranks: the memory restarts)."""
    rank, world = _world()
    path = _own_file(folder, f"memory_rank{rank:05d}")
    if manifest.get("world_size") != world or path is None:
        return None
    try:
        return load_tree(path) if path.suffix == ".safetensors" else torch_load(path)
    except UnsafeFileError as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from None


def _own_file(folder: Path, stem: str) -> Path | None:
    """``stem.safetensors``, or ``stem.pt`` as written by older versions (loaded without pickle's code)."""
    for suffix in (".safetensors", ".pt"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


def load(engine, folder: Path, manifest: dict, load_engine=None) -> dict:
    """Restores engine (module, optimizer, scheduler) and this rank's RNG; returns trainer_state.
    ``load_engine``: restores the engine instead of DeepSpeed (pretrain.elastic, another layout)."""
    verify_crcs(folder, manifest)
    rank, _ = _world()
    guard_deepspeed_loads(engine)
    try:
        path = load_engine() if load_engine is not None else \
            engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)[0]
    except UnsafeFileError as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if path is None:
        raise CheckpointError(f"cannot load checkpoint {folder}: DeepSpeed found no model states for this "
                              "parallel layout (was it saved with different --tp/--zero-stage?)")
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
        # resumed with more processes than saved it: start from rank 0's
        rng_file = _own_file(folder, f"rng_rank{rank:05d}") or _own_file(folder, "rng_rank00000")
        if rng_file is None:
            raise CheckpointError(f"checkpoint {folder} is partial: it has no RNG state")
        set_rng_tree(load_tree(rng_file) if rng_file.suffix == ".safetensors" else torch_load(rng_file))
    except UnsafeFileError as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from None
    return state
