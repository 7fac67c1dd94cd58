"""submit: run the planned runs as a Slurm job array (``slurm/sweep.sh``) or locally one after another.

Runs that are already complete (their metrics.jsonl reached the planned step) are skipped; a partly
done run resumes (the training program resumes from RUN_DIR/checkpoints/latest). The module launched
is ``$TRAIN_MODULE`` (default ``pretrain.train``), as in slurm/pretrain.sh.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .collect import summarize_run
from .plan import load_manifest

REPO = Path(__file__).resolve().parents[2]


def pending_runs(manifest: dict) -> list[tuple[int, dict]]:
    return [(i, r) for i, r in enumerate(manifest["runs"]) if not summarize_run(r)["complete"]]


def local_command(run: dict, nproc: int) -> list[str]:
    module = os.environ.get("TRAIN_MODULE", "pretrain.train")
    if nproc <= 1:
        return [sys.executable, "-m", module, "--config", run["config"]]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, "--config", run["config"]]


def submit_local(sweep_dir, nproc: int | None = None) -> list[str]:
    """Runs every pending run in turn (output in RUN_DIR/train.log); returns the names that failed."""
    manifest = load_manifest(sweep_dir)
    nproc = nproc or manifest["nproc"]
    failed = []
    todo = pending_runs(manifest)
    for k, (_, run) in enumerate(todo, 1):
        cmd = local_command(run, nproc)
        print(f"[{k}/{len(todo)}] {run['name']}: {run['steps']} steps, N={run['n_params']:,}", flush=True)
        with open(Path(run["dir"]) / "train.log", "a", encoding="utf-8") as log:
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc:
            print(f"  failed with exit code {rc}: see {run['dir']}/train.log", flush=True)
            failed.append(run["name"])
    return failed


def submit_slurm(sweep_dir, max_concurrent: int = 4, nproc: int | None = None, sbatch_args: list[str] = ()) -> str | None:
    """sbatch one array job over the pending runs (``%max_concurrent`` at a time); returns its job id."""
    sweep = Path(sweep_dir).absolute()
    manifest = load_manifest(sweep)
    todo = [i for i, _ in pending_runs(manifest)]
    if not todo:
        print("every run is complete; nothing to submit")
        return None
    (sweep / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "SWEEP_DIR": str(sweep), "NPROC_PER_NODE": str(nproc or manifest["nproc"]), "REPO": str(REPO)}
    cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, todo))}%{max_concurrent}",
           f"--output={sweep}/logs/%x-%A_%a.out", *sbatch_args, str(REPO / "slurm" / "sweep.sh")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    job = r.stdout.strip().split(";")[0]
    print(f"submitted array job {job}: {len(todo)} runs, at most {max_concurrent} at a time; logs in {sweep}/logs")
    return job
