"""How the trainer meets torch.distributed, parallel/ and DeepSpeed.

- :func:`ensure_env` lets a plain ``python -m pretrain.train`` run as a one-process world (the
  launchers — torchrun, deepspeed, srun via slurm/ — set RANK/WORLD_SIZE/MASTER_* themselves).
- :class:`DeepSpeedMPU` tells DeepSpeed the groups: its "data-parallel" group is **DP × CP**
  (``dims.dp_cp_group``): CP ranks hold replicas of every parameter but different tokens, so their
  gradients must be summed like DP ranks' (the trainer scales the loss so that DeepSpeed's
  average over the group becomes the global token mean), and ZeRO may shard over them. Its
  "model-parallel" group is TP, which DeepSpeed uses for the global gradient norm (sharded
  parameters, marked ``tensor_model_parallel`` by parallel/, count on every TP rank; replicated
  ones once).
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def ensure_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's variables, or a 1-process world."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


class DeepSpeedMPU:
    """The ``mpu`` object deepspeed.initialize accepts, built from parallel.ParallelDims."""

    def __init__(self, dims):
        self.dims = dims

    # data parallel = DP × CP (gradient reduction and ZeRO sharding)
    def get_data_parallel_group(self):
        return self.dims.dp_cp_group

    def get_data_parallel_world_size(self):
        return self.dims.dp * self.dims.cp

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dims.dp_cp_group)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.dims.dp_cp_group)

    # model parallel = TP
    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_process_group_ranks(self.dims.tp_group)[0]

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum of a few numbers over every process (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
