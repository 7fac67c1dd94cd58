"""Launch helpers shared by the Triton wrappers of the families (ops/<family>/triton.py): tile sizes,
the MEMTRAIN_TRITON switch and the shared-memory check. Only torch is imported."""
from __future__ import annotations

import os

import torch


def _p2(n: int) -> int:
    """The kernels' tile size for n: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flag() -> str:
    return os.environ.get("MEMTRAIN_TRITON", "")


def _device_gives(x: torch.Tensor, table, size: int) -> bool:
    """A CUDA block on x's device has the shared memory the first bound ≥ size needs (none: no)."""
    need = next((b for bound, b in table if size <= bound), None)
    return need is not None and torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin >= need
