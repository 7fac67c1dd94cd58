"""Process groups for tensor (TP), context (CP) and data (DP) parallelism, from one call.

megatron-core's ``parallel_state`` builds the groups (rank order ``tp-cp-dp``: the TP ranks of a
CP rank are consecutive, then CP, then DP), so megatron's tensor-parallel layers find their
groups without being told. Everything else in ``parallel/`` reads the groups from the
:class:`ParallelDims` returned by :func:`init_parallel`.

    dims = init_parallel(tp=2, cp=2)      # world 8 → dp 2
    dims.tp_group, dims.cp_group, dims.dp_group, dims.dp_cp_group   # torch ProcessGroups
    dims.tp_rank, dims.cp_rank, dims.dp_rank
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    """Sizes, this process's coordinates and the process groups (None in single-process use)."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    tp_group: object = field(default=None, repr=False)
    cp_group: object = field(default=None, repr=False)
    dp_group: object = field(default=None, repr=False)
    dp_cp_group: object = field(default=None, repr=False)  # gradients are summed over DP × CP
    cp_global_ranks: tuple = ()  # global rank of each CP rank of this process's CP group

    def __post_init__(self):
        for name in ("tp", "cp", "dp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.cp_global_ranks:
            self.cp_global_ranks = tuple(range(self.cp))

    @property
    def cp_prev(self) -> int | None:
        """Global rank of the previous CP rank (None on CP rank 0)."""
        return None if self.cp_rank == 0 else self.cp_global_ranks[self.cp_rank - 1]

    @property
    def cp_next(self) -> int | None:
        """Global rank of the next CP rank (None on the last CP rank)."""
        return None if self.cp_rank == self.cp - 1 else self.cp_global_ranks[self.cp_rank + 1]


def _init_process_group(backend: str | None) -> None:
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and {missing} are not set: launch with torchrun "
            "(or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), or call init_process_group first"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))


def init_parallel(tp: int = 1, cp: int = 1, backend: str | None = None) -> ParallelDims:
    """Initialises torch.distributed (from env vars if needed) and megatron's parallel_state.

    dp = world_size // (tp · cp); a world size that tp · cp does not divide is an error.
    """
    tp, cp = int(tp), int(cp)
    if tp < 1 or cp < 1:
        raise ValueError(f"tp and cp must be ≥ 1, got tp={tp}, cp={cp}")
    _init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * cp):
        raise ValueError(f"world size {world} is not divisible by tp × cp = {tp} × {cp} = {tp * cp}")
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    return ParallelDims(
        tp=tp,
        cp=cp,
        dp=world // (tp * cp),
        rank=rank,
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_global_ranks=tuple(ps.get_context_parallel_global_ranks()),
    )


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Tears down megatron's groups (and torch.distributed itself when asked)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


# accessors (the dataclass fields are the primary interface; these mirror megatron's names)
def get_tp_group(dims: ParallelDims):
    return dims.tp_group


def get_cp_group(dims: ParallelDims):
    return dims.cp_group


def get_dp_group(dims: ParallelDims, with_context_parallel: bool = False):
    return dims.dp_cp_group if with_context_parallel else dims.dp_group


def single_process_dims() -> ParallelDims:
    """tp = cp = dp = 1 without torch.distributed (for code paths that accept dims everywhere)."""
    return ParallelDims()
