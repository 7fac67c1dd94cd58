"""slurm/pretrain.sh, pretrain_1b.sh and sweep.sh on a real one-node Slurm (installed and started by
the test) running the real training program (python -m pretrain.train) with 2 processes on CPU.

An uninterrupted run through pretrain_1b.sh (its defaults overridden down to the `test` model); the
requeue path (USR1 to the batch script → the training processes save and exit 0 → `scontrol
requeue` → the job runs again and resumes from `latest`) ending with the same losses; a tiny sweep
run locally (plan → submit --local → collect → fit → plot) and then partly again as a job array.
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
PROGRAM = ("pretrain.train", ["--model", "test", "--data", "synthetic", "--steps", "120", "--seq-len", "32",
                           "--micro-batch", "2", "--precision", "fp32", "--zero-stage", "1", "--lr", "1e-3",
                           "--warmup", "5", "--save-every", "50", "--seed", "0", "--eval-every", "60",
                           "--no-tensorboard"])


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


def _log(tmp, job):
    return (Path(tmp) / f"{job}.out").read_text(errors="replace")


STEPS = 120
ARGS = ["--model", "test", "--data", "synthetic", "--steps", str(STEPS), "--seq-len", "32", "--micro-batch", "2",
        "--grad-accum", "1", "--tp", "1", "--cp", "1", "--zero-stage", "1", "--precision", "fp32", "--lr", "1e-3",
        "--schedule", "cosine", "--warmup", "5", "--save-every", "50", "--seed", "0", "--eval-every", "60",
        "--eval-batches", "4", "--no-activation-checkpointing", "--no-tensorboard"]
ENV = {"NPROC_PER_NODE": "2", "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def plain_run(slurm):
    """An uninterrupted 2-process run submitted through pretrain_1b.sh (by full path, from another
    directory): its 1B defaults overridden by sbatch options (1 node, no GPU) and by later flags."""
    tmp = Path(tempfile.mkdtemp(prefix="memtrain-plain-"))
    t = time.monotonic()
    job = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp}/%j.out",
                        str(REPO / "slurm" / "pretrain_1b.sh"), *ARGS],
                       env={**ENV, "RUN_DIR": str(tmp / "run"), "DATA": "synthetic"}, cwd=tmp)
    info = slurm.wait(job, timeout=240)
    seconds = time.monotonic() - t
    log = _log(tmp, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "2 processes, torchrun" in log and "training test" in log, log
    assert (tmp / "run" / "logs" / f"slurm-memtrain-1b-{job}.out").read_text() == log  # the copy under the run
    losses = _losses(tmp / "run")
    assert sorted(losses) == list(range(1, STEPS + 1)), log
    assert (tmp / "run" / "checkpoints" / "latest").is_file()
    lines = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(lines[0])
    assert any("val_loss" in r for r in lines)
    print(f"plain job (pretrain_1b.sh, torchrun): {seconds:.1f} s")
    return losses


def test_pretrain_1b_sh_uninterrupted_run(plain_run):
    assert len(plain_run) == STEPS


def _config_lines(log: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("CONFIG ")]


def test_pretrain_1b_sh_gpus_per_node_0_runs_the_1b_yaml_recipe(slurm, tmp_path):
    """The override for a CPU partition (`sbatch --gpus-per-node=0`, no NPROC_PER_NODE) starts one
    process per node, which gets configs/runs/1b.yaml (eval included) + DATA + RUN_DIR + later flags;
    no output file lands in the submit directory (the log is under RUN_DIR/logs)."""
    from pretrain.config import TrainConfig, load_config_file

    submit_dir = tmp_path / "checkout"
    submit_dir.mkdir()
    run = tmp_path / "run"
    job = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", str(REPO / "slurm" / "pretrain_1b.sh"),
                        "--steps", "7"],
                       env={"DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, "RUN_DIR": str(run), "DATA": "synthetic",
                            "TRAIN_MODULE": "tests.slurm.print_config"}, cwd=submit_dir)
    info = slurm.wait(job, timeout=120)
    log = (run / "logs" / f"slurm-memtrain-1b-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert list(submit_dir.iterdir()) == [], log
    assert "1 node(s) x 1 = 1 processes" in log, log
    (got,) = _config_lines(log)
    assert got["rank"] == 0 and got["world"] == 1
    recipe = load_config_file(REPO / "configs" / "runs" / "1b.yaml")
    assert recipe["eval_every"] > 0
    want = TrainConfig(**{**recipe, "data": "synthetic", "out": str(run), "steps": 7}).to_dict()
    assert got["config"] == want


@pytest.mark.parametrize("nproc", ["0", "two"])
def test_pretrain_sh_refuses_a_bad_process_count(slurm, tmp_path, nproc):
    job = slurm.sbatch([str(REPO / "slurm" / "pretrain.sh"), "--steps", "3"],
                       env={"PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": nproc,
                            "TRAIN_MODULE": "tests.slurm.print_config"}, cwd=tmp_path)
    info = slurm.wait(job, timeout=60)
    log = (tmp_path / "run" / "logs" / f"slurm-memtrain-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"pretrain.sh: error: processes per node from NPROC_PER_NODE: '{nproc}' is not a whole number" in log, log
    assert not _config_lines(log), log  # nothing was launched


def test_pretrain_sh_requeue_resumes_with_the_same_losses(slurm, plain_run, tmp_path):
    """The same run through pretrain.sh with the DeepSpeed launcher, signalled mid-way as
    --signal=B:USR1@T would: it saves, requeues itself, resumes, and logs the same losses."""
    t = time.monotonic()
    job = slurm.sbatch(["--cpus-per-task=2", f"--output={tmp_path}/%j.out", str(REPO / "slurm" / "pretrain.sh"), *ARGS],
                       env={**ENV, "RUN_DIR": str(tmp_path / "run"), "LAUNCHER": "deepspeed"}, cwd=REPO)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= STEPS // 4):
        assert time.monotonic() < deadline, _log(tmp_path, job)
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, job)
        time.sleep(0.05)
    t_sig = time.monotonic()
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))  # immediate; --signal=B:USR1@T comes 5–20 s late
    slurm.wait_state(job, {"PENDING", "REQUEUED"}, timeout=120)
    t_requeued = time.monotonic()
    slurm.wait_state(job, {"RUNNING"}, timeout=120)
    t_rerun = time.monotonic()
    info = slurm.wait(job, timeout=240)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert "requeueing job" in log and "(restart 1)" in log and "resumed from" in log, log
    saved = int(log.split("SIGUSR1: saved step ")[1].split(",")[0])
    assert 0 < saved < STEPS, log  # interrupted mid-way, not after the end
    assert _losses(tmp_path / "run") == plain_run, log  # bitwise the same 120 losses
    print(f"requeued job (deepspeed launcher): {time.monotonic() - t:.1f} s; USR1 → requeued "
          f"{t_requeued - t_sig:.1f} s; requeued → running {t_rerun - t_requeued:.1f} s; saved at step {saved}")


def test_tiny_sweep_local_then_slurm_array(slurm, tmp_path, monkeypatch):
    """plan → submit --local (the real training program) → collect → fit → plot; then two runs are
    wiped and re-run as a Slurm job array (--max-concurrent 1) and log the same losses."""
    import numpy as np
    import pandas as pd

    from pretrain.sweep import __main__ as cli
    from pretrain.sweep.submit import submit_slurm

    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1,64x2,128x2", "--tokens", "2e3,4e3",
                     "--seq-len", "32", "--micro-batch", "4", "--lr", "3e-3", "--vocab-size", "256"]) == 0
    t = time.monotonic()
    assert cli.main(["submit", "--sweep", str(sweep), "--local"]) == 0
    local_s = time.monotonic() - t
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 6 and df["complete"].all() and df["final_val_loss"].notna().all(), df.to_string()
    assert df["flops_logged"].gt(0).all()
    for run in df["name"]:  # planned as precision auto: fp32 on this CPU (bf16 autocast on CPU is slow and inexact)
        assert json.loads((sweep / "runs" / run / "train_config.json").read_text())["precision"] == "auto"
        assert json.loads((sweep / "runs" / run / "config.json").read_text())["precision"] == "fp32"
    assert cli.main(["fit", "--sweep", str(sweep), "--bootstrap", "4", "--starts", "8"]) == 0
    assert "ttt_linear" in json.loads((sweep / "fit.json").read_text())["fits"]
    assert cli.main(["plot", "--sweep", str(sweep)]) == 0
    for name in ("loss_vs_flops.png", "isoflop.png"):
        assert (sweep / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same runs as a job array: wipe two, submit, compare
    import shutil

    redo = list(df["name"][:2])
    before = {n: _losses(sweep / "runs" / n) for n in redo}
    for n in redo:
        (sweep / "runs" / n / "metrics.jsonl").unlink()
        shutil.rmtree(sweep / "runs" / n / "checkpoints")
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("PYTHON", sys.executable)
    t = time.monotonic()
    job = submit_slurm(sweep, max_concurrent=1, sbatch_args=["--cpus-per-task=2"])
    info = slurm.wait(job, timeout=240)
    array_s = time.monotonic() - t
    records = info.get("records", [info])
    logs = "\n".join(p.read_text() for p in (sweep / "logs").glob("*.out"))
    assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), logs
    first, second = sorted(records, key=lambda r: r["StartTime"])
    assert second["StartTime"] >= first["EndTime"], records  # --max-concurrent 1: one after the other
    for n in redo:
        after = _losses(sweep / "runs" / n)
        assert sorted(after) == sorted(before[n]), logs
        np.testing.assert_allclose([after[k] for k in sorted(after)], [before[n][k] for k in sorted(after)], rtol=1e-3)
    assert submit_slurm(sweep) is None  # nothing left to run
    print(f"local sweep of 6 runs: {local_s:.1f} s; 2-task array: {array_s:.1f} s")
