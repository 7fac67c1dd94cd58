"""Issue 17: the divergence guard, settings-locked resume, DeepSpeed JSON ↔ flags, one-line errors.

Runs the trainer in this process (``main(argv)``: no interpreter start-up per run) on the tiny
``test`` model for a few steps.
"""
import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from pretrain.optim import LRSchedule

from tests.pretrain.test_train import BASE, free_port

TRAIN = [*BASE, "--micro-batch", "2"]


@pytest.fixture
def trainer(monkeypatch):
    """train(out, *flags) → (exit status, stdout, stderr) of ``pretrain.train.main`` in this process."""
    from pretrain.train import main

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)

    def train(out, *args):
        from deepspeed.utils import logger

        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        stdout, stderr = io.StringIO(), io.StringIO()
        # our own streams, never closed (pytest's per-test capture streams are closed after each test,
        # and DeepSpeed's logger keeps the stream it was created with)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            streams = [(h, h.stream) for h in logger.handlers if isinstance(h, logging.StreamHandler)]
            for h, _ in streams:
                h.stream = stdout
            try:
                code = main([*TRAIN, "--out", str(out), *map(str, args)])
            finally:
                for h, stream in streams:
                    h.stream = stream
        return code, stdout.getvalue(), stderr.getvalue()
    return train


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def latest(out):
    ck = Path(out) / "checkpoints"
    return ck / (ck / "latest").read_text().strip()


def weights(folder):
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]


# ------------------------------------------------------------------------------ 1. divergence
@pytest.mark.parametrize("zero", [0, 1])
def test_divergent_run_stops_and_keeps_the_last_good_checkpoint(trainer, tmp_path, zero):
    """--lr 1e6: step 1 is finite, then every loss is NaN. Before: NaN to the end, exit 0, NaN
    checkpoints pruning the finite ones, bare NaN in metrics.jsonl. Now: the NaN steps are skipped
    (weights and LR schedule untouched), the run stops after --max-bad-steps with one error line and
    exit status 3, the only checkpoint is step 1's, and metrics.jsonl is valid JSON with nulls."""
    out = tmp_path / "run"
    code, _, stderr = trainer(out, "--lr", "1e6", "--steps", 10, "--save-every", 1, "--keep-checkpoints", 1,
                              "--max-bad-steps", 3, "--zero-stage", zero)
    assert code == 3
    err = error_line(stderr)
    assert "3 consecutive non-finite steps, the last at step 4" in err and "rank 0" in err, err
    rows = metrics(out)  # json.loads accepted every line
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert math.isfinite(rows[0]["loss"]) and all(r["loss"] is None and r["skipped"] for r in rows[1:])
    assert rows[1]["lr"] == rows[2]["lr"] == rows[3]["lr"]  # the schedule does not advance on a skipped step
    assert latest(out).name == "step_00000001"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert all(torch.isfinite(t).all() for t in weights(latest(out)).values())


def test_skipped_steps_leave_the_weights_alone(trainer, tmp_path):
    """A run that ends inside a streak of skipped steps saves weights equal to the last good step's."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert trainer(good, "--lr", "1e6", "--steps", 1, "--zero-stage", 0)[0] == 0
    assert trainer(bad, "--lr", "1e6", "--steps", 3, "--zero-stage", 0)[0] == 0  # 2 bad steps < max 5
    w1, w3 = weights(latest(good)), weights(latest(bad))
    assert latest(bad).name == "step_00000003"
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_loss_spike_is_reported_and_optionally_skipped(trainer, tmp_path):
    """--spike-k tiny: every step over the window's mean is a spike; with --skip-spikes it is not
    applied (weights unchanged, recorded as skipped 'spike') and is not a divergence."""
    out = tmp_path / "run"
    code, text, _ = trainer(out, "--steps", 6, "--spike-k", 1e-9, "--spike-window", 2, "--skip-spikes",
                            "--warmup", 0, "--lr", 1e-9, "--zero-stage", 0)
    assert code == 0
    rows = metrics(out)
    spiked = [r["step"] for r in rows if r.get("skipped") == "spike"]
    assert all(f"loss spike at step {s}:" in text for s in spiked)
    assert spiked and set(spiked) <= {3, 4, 5, 6}


# ------------------------------------------------------------------------------ 2. settings lock
def test_resume_with_other_settings_is_refused_then_allowed(trainer, tmp_path):
    out = tmp_path / "run"
    assert trainer(out, "--steps", 2, "--lr", 3e-3)[0] == 0
    before = (out / "config.json").read_text()
    code, _, stderr = trainer(out, "--steps", 3, "--lr", 0.05, "--seq-len", 32)
    assert code == 2
    err = error_line(stderr)
    assert "lr 0.003 → 0.05" in err and "seq_len 64 → 32" in err and "--allow-change seq_len,lr" in err, err
    assert (out / "config.json").read_text() == before and latest(out).name == "step_00000002"
    # harmless keys change freely; an allowed change takes effect from the next step and is recorded
    assert trainer(out, "--steps", 4, "--lr", 0.05, "--allow-change", "lr")[0] == 0
    rows = metrics(out)
    schedule = LRSchedule("cosine", 4, 2)  # --steps 4 --warmup 2
    assert rows[1]["lr"] == 3e-3 * schedule(1) and rows[2]["lr"] == 0.05 * schedule(2)  # the new peak, at once
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.05 and config["steps"] == 4
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["step"] == 2 and history[1]["changes"]["lr"] == [3e-3, 0.05]


def test_deepspeed_json_sets_the_zero_stage_it_trains(trainer, tmp_path):
    out = tmp_path / "run"
    zero3 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
    code, text, _ = trainer(out, "--steps", 1, "--deepspeed-config", zero3)
    assert code == 0 and "ZeRO 3" in text
    assert json.loads((out / "config.json").read_text())["zero_stage"] == 3
    assert json.loads((latest(out) / "trainer_state.json").read_text())["config"]["zero_stage"] == 3
    code, _, stderr = trainer(tmp_path / "other", "--steps", 1, "--deepspeed-config", zero3, "--zero-stage", 1)
    assert code == 2 and "zero_optimization.stage = 3 but --zero-stage is 1" in error_line(stderr)


# ------------------------------------------------------------------------------ 5. one-line errors
@pytest.mark.parametrize("args,message", [
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--lr", "inf"), "--lr must be a finite number"),
    (("--lr", "0"), "--lr must be > 0"),
    (("--eps", "-1"), "--eps must be > 0"),
    (("--beta2", "1"), "--beta2 must be in [0, 1)"),
    (("--grad-clip", "-1"), "--grad-clip must be ≥ 0"),
    (("--max-bad-steps", "0"), "--max-bad-steps must be ≥ 1"),
    (("--allow-change", "lr,bogus"), "unknown settings: bogus"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_bad_numbers_are_one_clear_error(trainer, tmp_path, args, message):
    out = tmp_path / "run"
    code, _, stderr = trainer(out, "--steps", 1, *args)
    assert code == 2 and message in error_line(stderr)
    assert not out.exists()


def test_out_is_a_file(trainer, tmp_path):
    out = tmp_path / "file"
    out.write_text("precious")
    code, _, stderr = trainer(out, "--steps", 1)
    assert code == 2 and "is a file" in error_line(stderr)
    assert out.read_text() == "precious"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_malformed_deepspeed_config(trainer, tmp_path, text):
    ds = tmp_path / "ds.json"
    ds.write_text(text)
    code, _, stderr = trainer(tmp_path / "run", "--steps", 1, "--deepspeed-config", ds)
    assert code == 2 and "--deepspeed-config" in error_line(stderr)


# ------------------------------------------------------------------------------ 4. no pickle code
class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(folder: Path, name: str, marker: Path, remove: str | None = None) -> None:
    """Replaces ``name`` in a checkpoint by a pickle payload and fixes the manifest, as an attacker would."""
    from pretrain import checkpoint

    torch.save({"module": Payload(marker), "t": torch.zeros(1)}, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    if remove:
        (folder / remove).unlink()
        del manifest["files"][remove]
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "crc32": checkpoint.crc32_file(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_torch_load_refuses_a_payload(tmp_path):
    from pretrain.safe_files import UnsafeFileError, torch_load

    marker = tmp_path / "ran"
    torch.save(Payload(marker), tmp_path / "x.pt")
    with pytest.raises(UnsafeFileError, match="posix.system|os.system|not among the types allowed"):
        torch_load(tmp_path / "x.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name,remove", [("mp_rank_00_model_states.pt", None),
                                         ("rng_rank00000.pt", "rng_rank00000.safetensors")], ids=["deepspeed", "rng"])
def test_planted_payload_does_not_run_on_resume_or_export(trainer, tmp_path, name, remove):
    from pretrain.export import main as export

    out, marker = tmp_path / "run", tmp_path / "ran"
    assert trainer(out, "--steps", 1, "--zero-stage", 0)[0] == 0
    plant(latest(out), name, marker, remove)
    code, _, stderr = trainer(out, "--steps", 2, "--zero-stage", 0)
    assert code == 2 and "not among the types allowed" in error_line(stderr)
    if name.startswith("mp_rank"):
        assert export([str(out), str(tmp_path / "hf")]) == 2
    assert not marker.exists()


def test_memory_state_round_trips_through_safetensors(tmp_path):
    from models import MemoryLMForCausalLM, preset_config
    from pretrain.safe_files import load_tree, save_tree

    torch.manual_seed(0)
    model = MemoryLMForCausalLM(preset_config("test")).eval()
    with torch.no_grad():
        state = model(torch.randint(0, 100, (2, 16)), use_cache=True).memory_state
    save_tree(state, tmp_path / "m.safetensors")
    back = load_tree(tmp_path / "m.safetensors")
    assert type(back) is type(state) and back.position == state.position
    flat = []
    state.map(lambda t: flat.append(t) or t)
    again = []
    back.map(lambda t: again.append(t) or t)
    assert len(flat) == len(again) > 0 and all(torch.equal(a, b) for a, b in zip(flat, again))


def test_export_max_shard_size_is_checked(tmp_path, capsys):
    from pretrain.export import main as export

    assert export([str(tmp_path), str(tmp_path / "hf"), "--max-shard-size", "banana"]) == 2
    err = capsys.readouterr().err
    assert "--max-shard-size must be a size like 5GB" in err and "Traceback" not in err


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(trainer, tmp_path, monkeypatch):
    """ENOSPC while the second checkpoint is written: exit 2 with one error line, no .tmp-step_* folder
    left, 'latest' still names the first checkpoint, and the run resumes from it once there is space."""
    import errno

    from pretrain import checkpoint

    out = tmp_path / "run"
    real = checkpoint.save_tree

    def full_disk(tree, path):
        if "step_00000002" in str(path):
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tree, path)
    monkeypatch.setattr(checkpoint, "save_tree", full_disk)
    code, _, stderr = trainer(out, "--steps", 3, "--save-every", 1, "--zero-stage", 0)
    assert code == 2
    err = error_line(stderr)
    assert "cannot save the checkpoint of step 2" in err and "No space left on device" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    monkeypatch.setattr(checkpoint, "save_tree", real)
    code, text, _ = trainer(out, "--steps", 3, "--save-every", 1, "--zero-stage", 0)
    assert code == 0 and "resumed from" in text and latest(out).name == "step_00000003"


def _nan_from_step_2_on_rank_1(out, zero):
    """Run by every rank of run_distributed: rank 1's loss is NaN from its second step on."""
    import torch.distributed as dist

    import parallel
    import pretrain.train as train

    real, calls = parallel.parallel_cross_entropy, []

    def parallel_cross_entropy(logits, labels, dims):  # the trainer's loss (imported from parallel when it starts)
        total, count = real(logits, labels, dims)
        calls.append(1)
        return (total * math.nan if dist.get_rank() == 1 and len(calls) > 1 else total), count
    parallel.parallel_cross_entropy = parallel_cross_entropy
    return train.main([*TRAIN, "--out", str(out), "--steps", "6", "--save-every", "1", "--max-bad-steps", "2",
                       "--zero-stage", str(zero)])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, zero):
    """DP=2: only rank 1 sees NaN; both ranks skip steps 2 and 3 and exit 3 together (no hang), and
    the last checkpoint is step 1's."""
    from parallel.launch import run_distributed

    out = tmp_path / "run"
    assert run_distributed(_nan_from_step_2_on_rank_1, world_size=2, args=(str(out), zero), timeout=600) == [3, 3]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("skipped") for r in rows] == [None, "non-finite", "non-finite"]
    assert latest(out).name == "step_00000001"
