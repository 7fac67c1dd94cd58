"""slurm/pretrain.sh and slurm/sweep.sh on a real one-node Slurm (installed and started by the test).

Uninterrupted 2-process run; the requeue path (USR1 to the batch script → the training processes
save and exit 0 → `scontrol requeue` → the job runs again and resumes from `latest`) ending with the
same losses; a sweep as a job array. Until pretrain.train (issue 7) lands the jobs run a stand-in
(tests/slurm/standin_train.py) with the same contract; the tests of the real program are written
below and skipped with the reason.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
HAVE_TRAIN = (REPO / "pretrain" / "train.py").is_file()
NO_TRAIN = "pretrain.train (issue 7) has not landed yet: pretrain/train.py does not exist"

STANDIN = ("tests.slurm.standin_train", ["--steps", "16", "--seed", "3", "--save-every", "4"])
REAL = ("pretrain.train", ["--model", "test", "--data", "synthetic", "--steps", "12", "--seq-len", "32",
                           "--micro-batch", "2", "--precision", "fp32", "--zero-stage", "1", "--lr", "1e-3",
                           "--warmup", "2", "--save-every", "3", "--seed", "0"])


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="memtrain-slurm-"))
    try:
        cluster = LocalSlurm.start(root)
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.running_daemons(), f"still running after stop: {cluster.running_daemons()}"


def _losses(run_dir: Path) -> dict:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _submit(slurm, tmp, run_dir, module, args, launcher="torchrun"):
    env = {"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2", "TRAIN_MODULE": module, "LAUNCHER": launcher,
           "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable}
    return slurm.sbatch(["--cpus-per-task=2", f"--output={tmp}/%j.out", "--job-name=t",
                         str(REPO / "slurm" / "pretrain.sh"), *args], env=env, cwd=REPO)


def _log(tmp, job):
    return (Path(tmp) / f"{job}.out").read_text(errors="replace")


def _run_then_requeue(slurm, tmp, module, args, steps):
    """An uninterrupted run (torchrun), then a run signalled mid-way (DeepSpeed launcher) that must
    requeue, resume and log the same losses."""
    timings = {}
    t = time.monotonic()
    job = _submit(slurm, tmp, tmp / "plain", module, args)
    info = slurm.wait(job, timeout=240)
    timings["plain_job_s"] = time.monotonic() - t
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _log(tmp, job)
    plain = _losses(tmp / "plain")
    assert sorted(plain) == list(range(1, steps + 1)), _log(tmp, job)
    assert (tmp / "plain" / "checkpoints" / "latest").is_file()

    t = time.monotonic()
    job = _submit(slurm, tmp, tmp / "requeued", module, args, launcher="deepspeed")
    metrics = tmp / "requeued" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps // 3):
        assert time.monotonic() < deadline, _log(tmp, job)
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp, job)
        time.sleep(0.1)
    t_sig = time.monotonic()
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@T sends
    slurm.wait_state(job, {"PENDING", "REQUEUED"}, timeout=120)
    t_requeued = time.monotonic()
    slurm.wait_state(job, {"RUNNING"}, timeout=120)
    t_rerun = time.monotonic()
    info = slurm.wait(job, timeout=240)
    timings.update(requeued_job_s=time.monotonic() - t, signal_to_requeued_s=t_requeued - t_sig,
                   requeued_to_running_s=t_rerun - t_requeued)
    log = _log(tmp, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert "requeueing job" in log and "(restart 1)" in log, log
    resumed = _losses(tmp / "requeued")
    assert resumed == plain, log  # the same steps and the same losses as the uninterrupted run
    print(" ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return timings


def test_pretrain_sh_standin_run_and_requeue(slurm, tmp_path):
    _run_then_requeue(slurm, tmp_path, *STANDIN, steps=16)


@pytest.mark.skipif(not HAVE_TRAIN, reason=NO_TRAIN)
def test_pretrain_sh_real_training_run_and_requeue(slurm, tmp_path):
    _run_then_requeue(slurm, tmp_path, *REAL, steps=12)


def test_pretrain_1b_sh_wrapper(slurm, tmp_path):
    """The 1B script's defaults pass through pretrain.sh; sbatch options and later flags override
    them; submitted by full path from another directory (the checkout is found from the script)."""
    module, args = STANDIN
    env = {"RUN_DIR": str(tmp_path / "run"), "DATA": "synthetic", "NPROC_PER_NODE": "2", "TRAIN_MODULE": module,
           "PYTHON": sys.executable}
    job = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp_path}/%j.out",
                        str(REPO / "slurm" / "pretrain_1b.sh"), *args, "--steps", "4"], env=env, cwd=tmp_path)
    info = slurm.wait(job, timeout=180)
    assert info["JobState"] == "COMPLETED", _log(tmp_path, job)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4], _log(tmp_path, job)


def test_sweep_job_array(slurm, tmp_path, monkeypatch):
    from pretrain.sweep import __main__ as cli
    from pretrain.sweep.collect import collect

    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1", "--tokens", "2e3,4e3",
                     "--seq-len", "32", "--micro-batch", "2", "--nproc", "2", "--save-every", "5"]) == 0
    for k, v in slurm.env.items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_"))]:
        if k != "SLURM_CONF":
            monkeypatch.delenv(k)
    monkeypatch.setenv("TRAIN_MODULE", STANDIN[0])
    monkeypatch.setenv("PYTHON", sys.executable)
    from pretrain.sweep.submit import submit_slurm

    job = submit_slurm(sweep, max_concurrent=1, sbatch_args=["--cpus-per-task=2"])
    info = slurm.wait(job, timeout=240)
    records = info.get("records", [info])
    logs = "\n".join(p.read_text() for p in (sweep / "logs").glob("*.out"))
    assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), logs
    first, second = sorted(records, key=lambda r: r["StartTime"])
    assert second["StartTime"] >= first["EndTime"], records  # --max-concurrent 1: one after the other
    df = collect(sweep)
    assert df["complete"].all(), df.to_string()
    assert list(df["steps_done"]) == [16, 32]  # 2e3 / (32·2·2) → 16 steps; 4e3 → 32
    assert submit_slurm(sweep) is None  # nothing left to run


@pytest.mark.skipif(not HAVE_TRAIN, reason=NO_TRAIN)
def test_local_tiny_sweep_through_training_program(tmp_path):
    """plan → submit --local (the real training program) → collect → fit → plot."""
    from pretrain.sweep import __main__ as cli

    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1,64x2,128x2", "--tokens", "4e3,8e3",
                     "--seq-len", "32", "--micro-batch", "4", "--lr", "3e-3"]) == 0
    assert cli.main(["submit", "--sweep", str(sweep), "--local"]) == 0
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    import pandas as pd

    df = pd.read_csv(sweep / "results.csv")
    assert df["complete"].all() and df["final_val_loss"].notna().all(), df.to_string()
    assert cli.main(["fit", "--sweep", str(sweep), "--bootstrap", "4", "--starts", "8"]) == 0
    assert cli.main(["plot", "--sweep", str(sweep)]) == 0
    for name in ("loss_vs_flops.png", "isoflop.png"):
        assert (sweep / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
