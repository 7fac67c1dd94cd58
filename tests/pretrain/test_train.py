"""The training program end to end: parallel loss parity, exact resume, bad input."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = ["--model", "test", "--data", "synthetic", "--seq-len", "64", "--precision", "fp32", "--warmup", "2",
        "--lr", "3e-3", "--log-every", "1", "--no-tensorboard"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out, *args, nproc=1):
    launcher = [sys.executable, "-m", "pretrain.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pretrain.train"]
    return [*launcher, *BASE, "--out", str(out), *map(str, args)]


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None)
    return e


def run(out, *args, nproc=1, timeout=600):
    return subprocess.run(command(out, *args, nproc=nproc), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def losses(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    res = run(out, "--steps", 10, "--micro-batch", 4, "--zero-stage", 0)
    assert res.returncode == 0, res.stderr[-3000:]
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ("--zero-stage", 1, "--micro-batch", 2), ("--zero-stage", 2, "--micro-batch", 2),
    ("--zero-stage", 3, "--micro-batch", 2), ("--tp", 2, "--micro-batch", 4), ("--cp", 2, "--micro-batch", 4),
], ids=["dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2", "cp2"])
def test_two_process_losses_equal_single_process(single_process_losses, tmp_path, layout):
    """Same global batch (4 sequences of 64 tokens) split two ways: the first 10 losses agree."""
    res = run(tmp_path, "--steps", 10, *layout, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(tmp_path)
    assert len(got) == 10
    for a, b in zip(got, single_process_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (got, single_process_losses)
    assert single_process_losses[-1] < single_process_losses[0]  # and it is learning


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [
    (("--cp", 2, "--micro-batch", 2, "--grad-accum", 2, "--cp-interleave", "--zero-stage", 1), 2),
    (("--cp", 2, "--micro-batch", 4, "--zero-stage", 3), 2),
    (("--cp", 4, "--cp-heads", 2, "--micro-batch", 4), 4),
], ids=["cp2-interleaved-accum2", "cp2-zero3", "cp4-2d-2x2"])
def test_cp_schedules_losses_equal_single_process(single_process_losses, tmp_path, layout, nproc):
    """Micro-batch interleaving (2 micro-batches of 2 sequences), CP under ZeRO-3
    (packed synthetic documents: the CP blocks are ZeRO-3 leaves) and 2-D CP (heads 2 × sequence 2):
    the same global batch, the same first losses."""
    res = run(tmp_path, "--steps", 4, *layout, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(tmp_path)
    assert len(got) == 4
    for a, b in zip(got, single_process_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (got, single_process_losses)


def _interrupt(tmp_path, sig, *args, nproc=1):
    args = args or ("--micro-batch", 4)
    proc = subprocess.Popen(command(tmp_path, "--steps", 15, "--save-every", 5, *args, nproc=nproc), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    reference = tmp_path_factory.mktemp("uninterrupted")
    assert run(reference, "--steps", 15, "--micro-batch", 4, "--save-every", 5).returncode == 0
    return losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_run_resumes_exactly(tmp_path, sig, uninterrupted_losses):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    code, output = _interrupt(interrupted, sig)
    if sig == signal.SIGTERM:
        assert code == 0 and "saved" in output, output[-2000:]
        assert len(losses(interrupted)) < 15
    else:
        assert code == -signal.SIGKILL
    res = run(interrupted, "--steps", 15, "--micro-batch", 4, "--save-every", 5)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert losses(interrupted) == uninterrupted_losses  # bitwise: same floats, same 15 steps


@pytest.mark.slow
def test_two_process_zero3_run_resumes_exactly_after_sigterm_to_torchrun(tmp_path):
    """SIGTERM to the torchrun agent (what Slurm signals): it forwards SIGTERM to both ranks, which
    agree on a step, save the ZeRO-3 partitions and exit 0 (torchrun itself then exits 1 with its
    own SignalException); the re-run continues bitwise like an uninterrupted two-process run."""
    layout = ("--micro-batch", 2, "--zero-stage", 3)
    reference = tmp_path / "uninterrupted"
    res = run(reference, "--steps", 15, "--save-every", 5, *layout, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    _code, output = _interrupt(interrupted, signal.SIGTERM, *layout, nproc=2)
    assert output.count("SIGTERM: saved step") == 1, output[-3000:]  # one checkpoint, said once (rank 0)
    stopped = len(losses(interrupted))
    assert 7 <= stopped < 15
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    res = run(interrupted, "--steps", 15, "--save-every", 5, *layout, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(interrupted) == losses(reference)


# ------------------------------------------------------------------------------------ bad input
def _snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert run(out, "--steps", 2, "--micro-batch", 2).returncode == 0
    return out


def _bad(args, out):
    res = run(out, *args)
    assert res.returncode != 0
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return err[0]


BAD_ARGUMENTS = [
    (("--data", "/nonexistent/data"), "not found"),
    (("--tp", 3), "does not divide"),
    (("--cp", 3), "does not fit the sequence"),
    (("--cp", 4, "--cp-heads", 3), "--cp-heads 3 does not divide --cp 4"),
    (("--cp", 8, "--cp-heads", 8), "--cp-heads 8 does not divide the model's 4 heads per TP rank"),
    (("--cp-interleave",), "--cp-interleave interleaves"),
    (("--cp", 2, "--grad-accum", 2, "--cp-interleave", "--zero-stage", 3), "--cp-interleave with ZeRO-3 is not exact"),
    (("--model", "nonexistent-preset"), "neither a preset"),
    (("--precision", "fp8"), "FP8"),
    (("--steps", 0), "--steps"),
]


@pytest.mark.parametrize("args,message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_are_one_clear_error(tmp_path, monkeypatch, capsys, args, message):
    """In process (each is refused before any process group exists): one error line, status 2."""
    from pretrain.train import main

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    argv = [*BASE, "--out", str(out), "--steps", "2", *map(str, args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not out.exists()  # nothing written


def test_2d_cp_refuses_a_layer_whose_heads_interact(tmp_path, monkeypatch, capsys):
    """--cp-heads with a layer whose scan mixes its heads (Hope): one error line, before any process group."""
    from models import preset_config
    from pretrain.train import main

    folder = tmp_path / "hope"
    preset_config("test", memory_layer="hope").save_pretrained(folder)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    argv = [*BASE, "--out", str(tmp_path / "run"), "--steps", "2", "--model", str(folder), "--cp", "4", "--cp-heads", "2"]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cp_mode='2d' runs each memory layer's scan on a slice of its heads; hope's heads " \
                               "interact" in lines[0], lines


def test_bad_argument_from_the_command_line(tmp_path):
    """The real program: exit status 2 and exactly one error line, even with the launcher's imports."""
    err = _bad(["--steps", 2, "--tp", 3], tmp_path / "run")
    assert "--tp 3 does not divide" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["corrupt_file", "missing_manifest", "bad_latest"])
def test_damaged_checkpoint_is_refused_and_kept(finished_run, tmp_path, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ck = out / "checkpoints"
    folder = ck / (ck / "latest").read_text().strip()
    if damage == "corrupt_file":
        victim = max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "missing_manifest":
        (folder / "manifest.json").unlink()
    else:
        (ck / "latest").write_text("garbage\n")
    before = _snapshot(out)
    err = _bad(["--steps", 4, "--micro-batch", 2], out)
    assert "checkpoint" in err or "latest" in err, err
    assert _snapshot(out) == before  # nothing overwritten
