"""Run a function on N local processes (gloo, 127.0.0.1, a free port) and collect the results.
For tests and CPU benchmarks (real runs use torchrun / slurm).

    results = run_distributed(module_level_fn, world_size=4, args=(...,))   # list, one per rank

Each rank gets torch.set_num_threads(1), the env vars of torchrun (RANK, WORLD_SIZE, MASTER_*),
and its return value is sent back through a file. A rank that raises fails the call with its
traceback; a hang is killed after ``timeout`` seconds.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, outdir, threads):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from parallel.groups import destroy_parallel

                destroy_parallel(destroy_process_group=True)
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300, threads: int = 1) -> list:
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, outdir, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} did not finish in {timeout}s")
        except BaseException:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            errors = []
            for r in range(world_size):
                path = os.path.join(outdir, f"{r}.pt")
                if os.path.exists(path):
                    res = torch.load(path, weights_only=False)  # see below
                    if not res["ok"]:
                        errors.append(f"rank {r}:\n{res['error']}")
            if errors:
                raise RuntimeError("\n".join(errors)) from None
            raise
        results = []
        for r in range(world_size):
            # any picklable result, written by this call's own children into its private (0700) temporary
            # folder: inter-process results, not a checkpoint or any file a user hands in
            res = torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)
            if not res["ok"]:
                raise RuntimeError(f"rank {r}:\n{res['error']}")
            results.append(res["result"])
        return results
