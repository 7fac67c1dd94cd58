"""Checkpoint files that cannot run code when loaded.

What the project writes itself (RNG states, carried memory states) is safetensors: tensors plus
a JSON description in the header. DeepSpeed's own ``.pt`` files are read with
``torch.load(weights_only=True)`` and an explicit allow-list of the few non-tensor types they
hold; a file that needs anything else is refused with a :class:`UnsafeFileError`, never unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class UnsafeFileError(Exception):
    """A file that is unreadable or would need code to run to load it."""


def _allowed_globals() -> list:
    """DeepSpeed's checkpoint types (loss scaler, ZeRO stage, optimizer-fragment addresses); numpy
    arrays and the memory states, for RNG/memory files written by older versions as ``.pt``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            getattr(np, "_core", np.core).multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            *_STATE_CLASSES().values()]


def torch_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """``torch.load`` that unpickles nothing outside tensors, plain containers and the allow-list."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        what = str(exc).split("Unsupported global: GLOBAL ")[-1].split(" ")[0] if "GLOBAL" in str(exc) else "an object"
        raise UnsafeFileError(f"{path} holds {what}, which is not among the types allowed in checkpoint files "
                              "(tensors, containers, DeepSpeed's checkpoint types): refused, nothing in it was run") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise UnsafeFileError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def guard_deepspeed_loads(engine) -> None:
    """Every file DeepSpeed's ``load_checkpoint`` reads (module, optimizer, scheduler) goes through :func:`torch_load`."""
    engine.checkpoint_engine.load = lambda path, map_location=None: torch_load(path, map_location)


# ------------------------------------------------------------------------- trees in safetensors
def _STATE_CLASSES() -> dict:
    from models.hf.modeling_memory import MemoryState
    from models.common.state import LayerState
    from models.layers.ttt import TTTState
    from models.common.varlen import RowStates

    return {c.__name__: c for c in (MemoryState, LayerState, TTTState, RowStates)}


def _encode(obj, key: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"tensor": key}
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _STATE_CLASSES():
        return {"class": type(obj).__name__,
                "fields": {f.name: _encode(getattr(obj, f.name), f"{key}.{f.name}", tensors)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(node: dict, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "class" in node:
        cls = _STATE_CLASSES()[node["class"]]  # KeyError: not a state class
        return cls(**{k: _decode(v, tensors) for k, v in node["fields"].items()})
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]


def save_tree(tree, path: str | Path) -> None:
    """Tensors, containers, numbers and the model's state dataclasses → one safetensors file."""
    tensors: dict = {}
    structure = _encode(tree, "t", tensors)
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})


def load_tree(path: str | Path):
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        structure = json.loads(header["__metadata__"]["structure"])
        return _decode(structure, load_file(str(path)))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UnsafeFileError(f"cannot read {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


# ---------------------------------------------------------------------------------- RNG states
def rng_tree() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states as tensors and numbers."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tree = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tree["cuda"] = torch.cuda.get_rng_state()
    return tree


def set_rng_tree(tree: dict) -> None:
    if isinstance(tree["python"], tuple) and not isinstance(tree["python"][1], torch.Tensor):  # an old .pt file
        random.setstate(tree["python"])
        np.random.set_state(tree["numpy"])
    else:
        version, mt, gauss = tree["python"]
        random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
        name, keys, pos, has_gauss, cached = tree["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tree["torch"])
    if "cuda" in tree and torch.cuda.is_available():
        torch.cuda.set_rng_state(tree["cuda"])
