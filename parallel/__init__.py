"""Distributed training of memory-layer models: tensor parallelism by heads (every mixer),
context parallelism that passes the memory state rank to rank (a wavefront), the all-gather +
prefix combine for the affine DeltaNet family, all-gather / halo attention, Ulysses head
all-to-all (TTT), two-dimensional CP (heads × sequence, parallel/context2d.py), micro-batch
interleaving of the wavefront (parallel/interleave.py), and helpers for the loss and single-device
checkpoints. See docs/parallelism.md.
"""
from .groups import ParallelDims, destroy_parallel, init_parallel
from .loss import causal_targets, cp_slice, global_mean_loss, parallel_cross_entropy, validation_loss
from .parallelize import (
    CP_MODES,
    gather_full_grads,
    gather_full_state_dict,
    load_full_state_dict,
    parallelize,
    reduce_gradients,
)

__all__ = [
    "CP_MODES",
    "ParallelDims",
    "causal_targets",
    "cp_slice",
    "destroy_parallel",
    "gather_full_grads",
    "gather_full_state_dict",
    "global_mean_loss",
    "init_parallel",
    "load_full_state_dict",
    "parallel_cross_entropy",
    "parallelize",
    "reduce_gradients",
    "validation_loss",
]
