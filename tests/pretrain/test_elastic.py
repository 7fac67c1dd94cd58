"""Elastic resume: a run saved with one layout (DP, TP, ZeRO stage) continues with another.

A run is trained at the first layout to step 6 (checkpoints at 3 and 6); its step-6 checkpoint is
removed, as if the job had been killed after step 3, and the run is re-started at the second
layout. Its steps 4–6 must match an uninterrupted run at the second layout with the same global
batch (4 sequences of 64 tokens): same samples, same weights, same Adam moments and step count,
same learning rate.

Tolerance: 1e-5 relative, the one of the two-process parity tests in test_train.py. Both runs
compute in fp32 on the same samples; they differ only in how sums are split (DP all-reduce of
two halves vs. accumulation of two micro-batches; ZeRO partition boundaries), a few ulps per
step. Measured: ≤ 1e-7. Dropping the restored first Adam moment makes it 1.5e-3, so the test
sees a lost or misplaced optimizer state.
"""
import json
import shutil

import pytest

from tests.pretrain.test_train import losses, run

STEPS = ("--steps", 6, "--save-every", 3, "--keep-checkpoints", 0)

LAYOUTS = {  # id: (processes, flags) before → after
    "zero1-dp2-to-dp1": ((2, "--zero-stage", 1, "--micro-batch", 2), (1, "--zero-stage", 1, "--micro-batch", 2)),
    "zero3-dp2-to-dp1": ((2, "--zero-stage", 3, "--micro-batch", 2), (1, "--zero-stage", 3, "--micro-batch", 2)),
    "tp2-to-dp2-zero2": ((2, "--tp", 2, "--micro-batch", 4), (2, "--zero-stage", 2, "--micro-batch", 1)),
    "zero0-dp1-to-tp2": ((1, "--zero-stage", 0, "--micro-batch", 4), (2, "--zero-stage", 0, "--tp", 2, "--micro-batch", 4)),
}


def _trainer_state(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("before,after", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_resume_at_another_layout_continues_like_an_uninterrupted_run(tmp_path, before, after):
    (n1, *flags1), (n2, *flags2) = before, after
    first = tmp_path / "first"
    res = run(first, *STEPS, *flags1, nproc=n1)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = first / "checkpoints"
    shutil.rmtree(ck / "step_00000006")  # killed after the step-3 checkpoint
    (ck / "latest").write_text("step_00000003\n")

    res = run(first, *STEPS, *flags2, nproc=n2)  # the same command, other processes
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-sharding the weights and optimizer states" in res.stdout, res.stdout[-2000:]
    assert res.stdout.count("resumed from") == 1
    reference = tmp_path / "reference"
    res = run(reference, *STEPS, *flags2, "--global-batch-size", 4, nproc=n2)
    assert res.returncode == 0, res.stderr[-3000:]

    got, want = losses(first), losses(reference)
    assert len(got) == len(want) == 6
    for a, b in zip(got[3:], want[3:]):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
    # the global batch stayed 4 (accumulation re-derived) and the data continued where it stopped
    config = json.loads((first / "config.json").read_text())
    assert config["global_batch_size"] == 4 and config["grad_accum"] == json.loads(
        (reference / "config.json").read_text())["grad_accum"]
    assert _trainer_state(first, 6)["data"] == _trainer_state(reference, 6)["data"]
    assert _trainer_state(first, 6)["data"]["consumed_samples"] == 6 * 4


def _cfg(*argv):
    from pretrain.config import parse_config

    return parse_config([str(a) for a in argv])


def test_global_batch_is_recorded_and_kept_when_the_dp_size_changes():
    from pretrain.elastic import resolve_batch

    cfg = _cfg("--micro-batch", 2, "--grad-accum", 3)
    assert resolve_batch(cfg, 4, None) is None
    assert (cfg.global_batch_size, cfg.grad_accum) == (24, 3)  # recorded at the first start
    saved = cfg.to_dict()
    again = _cfg("--micro-batch", 2, "--grad-accum", 3)  # the same command on half the ranks
    note = resolve_batch(again, 2, saved, 4)
    assert (again.global_batch_size, again.grad_accum) == (24, 6) and "3 → 6" in note
    old = dict(saved, global_batch_size=0)  # a checkpoint from before --global-batch-size
    again = _cfg("--micro-batch", 4)
    resolve_batch(again, 1, old, 4)
    assert (again.global_batch_size, again.grad_accum) == (24, 6)
    given = _cfg("--micro-batch", 2, "--global-batch-size", 16)
    resolve_batch(given, 2, None)
    assert given.grad_accum == 4


def test_global_batch_errors_are_one_clear_line():
    from pretrain.config import ConfigError
    from pretrain.elastic import resolve_batch

    with pytest.raises(ConfigError, match="not divisible by micro-batch 2 × DP 4"):
        resolve_batch(_cfg("--micro-batch", 2, "--global-batch-size", 12), 4, None)
    with pytest.raises(ConfigError, match="differs from the run's 24"):
        resolve_batch(_cfg("--micro-batch", 2, "--global-batch-size", 16), 2,
                      _cfg("--micro-batch", 2, "--global-batch-size", 24).to_dict(), 4)
    with pytest.raises(ConfigError, match="not a multiple of --micro-batch 4"):
        _cfg("--micro-batch", 4, "--global-batch-size", 6)
    with pytest.raises(ConfigError, match="not both"):
        _cfg("--global-batch-size", 8, "--grad-accum", 2)
