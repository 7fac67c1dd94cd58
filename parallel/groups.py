"""Process groups for tensor (TP), context (CP) and data (DP) parallelism, from one call.

megatron-core's ``parallel_state`` builds the groups (rank order ``tp-cp-dp``: the TP ranks of a
CP rank are consecutive, then CP, then DP), so megatron's tensor-parallel layers find their
groups without being told. Everything else in ``parallel/`` reads the groups from the
:class:`ParallelDims` returned by :func:`init_parallel`.

    dims = init_parallel(tp=2, cp=2)      # world 8 → dp 2
    dims.tp_group, dims.cp_group, dims.dp_group, dims.dp_cp_group   # torch ProcessGroups
    dims.tp_rank, dims.cp_rank, dims.dp_rank

Two-dimensional CP (``cp_heads`` = P_h > 1, parallel/context2d.py) splits the CP group of size
P = P_h × P_s in two with megatron's hierarchical CP groups (``hierarchical_context_parallel_sizes
= [P_h, P_s]``): CP rank c = s·P_h + h is head rank h of the *head group* s (P_h consecutive CP
ranks: the all-to-all, inside a node) and sequence rank s of the *sequence group* h (CP ranks
h, h + P_h, …: the state pass)::

    P = 4, P_h = 2:   head groups {0, 1}, {2, 3}      sequence groups {0, 2}, {1, 3}
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
    cp_heads: int = 1  # P_h of two-dimensional CP (1: no split)
    cp_head_group: object = field(default=None, repr=False)  # the P_h CP ranks s·P_h … s·P_h + P_h − 1
    cp_seq_group: object = field(default=None, repr=False)  # the P_s CP ranks h, h + P_h, …

    def __post_init__(self):
        for name in ("tp", "cp", "dp", "cp_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.cp % self.cp_heads:
            raise ValueError(f"cp_heads={self.cp_heads} does not divide the context parallel size cp={self.cp}")
        if not self.cp_global_ranks:
            self.cp_global_ranks = tuple(range(self.cp))

    @property
    def cp_seq(self) -> int:
        """P_s: the sequence ranks of two-dimensional CP (cp // cp_heads)."""
        return self.cp // self.cp_heads

    @property
    def cp_head_rank(self) -> int:
        return self.cp_rank % self.cp_heads

    @property
    def cp_seq_rank(self) -> int:
        return self.cp_rank // self.cp_heads

    @property
    def cp_seq_prev(self) -> int | None:
        """Global rank of the previous rank of this sequence group (None on sequence rank 0)."""
        return None if self.cp_seq_rank == 0 else self.cp_global_ranks[self.cp_rank - self.cp_heads]

    @property
    def cp_seq_next(self) -> int | None:
        """Global rank of the next rank of this sequence group (None on the last)."""
        return None if self.cp_seq_rank == self.cp_seq - 1 else self.cp_global_ranks[self.cp_rank + self.cp_heads]

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


def init_parallel(tp: int = 1, cp: int = 1, backend: str | None = None, cp_heads: int = 1) -> ParallelDims:
    """Initialises torch.distributed (from env vars if needed) and megatron's parallel_state.

    dp = world_size // (tp · cp); a world size that tp · cp does not divide is an error.
    ``cp_heads`` > 1: the CP group is also split into head and sequence groups (two-dimensional CP).
    """
    tp, cp, cp_heads = int(tp), int(cp), int(cp_heads)
    if tp < 1 or cp < 1 or cp_heads < 1:
        raise ValueError(f"tp, cp and cp_heads must be ≥ 1, got tp={tp}, cp={cp}, cp_heads={cp_heads}")
    if cp % cp_heads:
        raise ValueError(f"cp_heads={cp_heads} does not divide the context parallel size cp={cp}")
    _init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * cp):
        raise ValueError(f"world size {world} is not divisible by tp × cp = {tp} × {cp} = {tp * cp}")
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=[cp_heads, cp // cp_heads] if cp_heads > 1 else None)
    head_group, seq_group = (ps.get_hierarchical_context_parallel_groups() if cp_heads > 1
                             else (None, ps.get_context_parallel_group()))
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
        cp_heads=cp_heads,
        cp_head_group=head_group,
        cp_seq_group=seq_group,
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
