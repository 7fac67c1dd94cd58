"""bench.layer --interleave, bench.memory and bench.kernels at toy sizes: they run, and report every row asked
for; bench/gpu_suite.sh and bench/gpu_wheels.sh parse (``bash bench/gpu_wheels.sh --check`` runs the suite at toy
size in an environment of the torch stack and the carried wheels only: minutes, so not a test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOY = ["--hidden", "32", "--heads", "2", "--mini-batch", "4"]


def _json_rows(args, env=ENV):
    res = subprocess.run([sys.executable, "-m", *args, "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # child processes
def test_step_memory_rows_and_equal_losses():
    """bench.step_memory: one row per (layer, group), attention once; scan checkpointing leaves the loss."""
    rows = _json_rows(["bench.step_memory", "--layers", "attention,titans", "--groups", "0,2", "--model", "64x2",
                       "--num-layers", "0", "--micro-batch", "1", "--seq-len", "64", "--vocab-size", "256", "--set", "titans_chunk_size=8"])
    assert [(r["layer"], r["group"], r["piece_tokens"]) for r in rows] == [
        ("attention", 0, 0), ("titans", 0, 0), ("titans", 2, 16)]
    assert rows[1]["loss"] == rows[2]["loss"] and all(r["peak_gib"] > 0 for r in rows)


@pytest.mark.slow  # child processes
def test_layer_interleaved_rows():
    rows = _json_rows(["bench.layer", "--layers", "ttt_mlp", "--interleave", "--iters", "2", "--seq-len", "32", *TOY])
    assert [(r["layer"], r["impl"]) for r in rows] == [("ttt_mlp", "chunked")]
    assert all(r["tokens_per_s"] > 0 and "load_avg_1m" in r for r in rows)


@pytest.mark.slow  # three processes (each imports torch)
def test_memory_rows_and_plot(tmp_path):
    png = tmp_path / "mem.png"
    rows = _json_rows(["bench.memory", "--layers", "ttt_linear", "--seq-lens", "32", "--group", "2",
                       "--plot", str(png), *TOY])
    assert [(r["seq_len"], r["group"]) for r in rows] == [(32, 0), (32, 2)]
    assert all(r["btdd_tensor_mb"] > 0 for r in rows) and png.stat().st_size > 0


@pytest.mark.slow  # one child process under the Triton interpreter
def test_kernels_rows_under_the_interpreter():
    """bench.kernels (the GPU comparison of the Triton kernels with the PyTorch path) at a toy size on
    the CPU interpreter: every layer's kernels ran and agree with PyTorch."""
    pytest.importorskip("triton")
    rows = _json_rows(["bench.kernels", "--hidden", "32", "--heads", "2", "--chunk", "16", "--window", "16",
                       "--seq-len", "48", "--iters", "1"], env=dict(ENV, TRITON_INTERPRET="1"))
    assert [r["layer"] for r in rows] == ["ttt_linear", "ttt_mlp", "titans", "lact"]
    assert all(r["kernels_ran"] for r in rows)
    assert all(r["out_rel_err"] < 1e-4 for r in rows)
    # LaCT's Newton–Schulz amplifies float32 rounding: both paths are ~1e-3 from float64 in its gate bias
    assert all(r["max_grad_rel_err"] < (1e-2 if r["layer"] == "lact" else 1e-4) for r in rows)


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_wheels.sh"])
def test_gpu_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow  # a training subprocess (DeepSpeed), an export and an evaluation: ~1.5 min on 2 cores
def test_bench_quality_toy(tmp_path, capsys):
    """bench.quality end to end at a toy size: trains, validates, exports, scores recall, writes the table
    and the plot; a bad layer name is one error line and exit status 2 before anything trains."""
    cmd = [sys.executable, "-m", "bench.quality", "--layers", "gated_deltanet", "--model", "test", "--seq-len", "32",
           "--micro-batch", "2", "--steps", "2", "--eval-every", "1", "--data", "synthetic", "--vocab-size", "256",
           "--recall-lengths", "32", "--recall-samples", "2", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    import csv

    (row,) = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert row["layer"] == "gated_deltanet" and row["steps_done"] == "2" and not row["error"]
    assert float(row["val_loss"]) > 0 and float(row["tokens_per_s"]) > 0 and float(row["grad_norm_step1"]) > 0
    assert 0 <= float(row["mqar@32"]) <= 1 and 0 <= float(row["passkey@32"]) <= 1
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    from bench import quality

    assert quality.main(["--layers", "attention,nope", *cmd[5:-1], str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # nothing written, nothing trained


def test_profile_step_reports_the_step_and_its_operators(capsys):
    """bench.profile_step in process at the test size, with packed documents: the step line and the table."""
    from bench.profile_step import main

    assert main(["--model", "test", "--seq-len", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "0",
                 "--docs", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "documents of mean length 8" in out and "tokens/s" in out and "Self CPU" in out
    with pytest.raises(SystemExit):
        main(["--steps", "0"])


def test_bench_quality_set(tmp_path, capsys):
    """--set KEY=VALUE: JSON values reach the model config; a field MemoryLMConfig lacks is one error line."""
    from bench import quality
    from pretrain.sweep.plan import model_config

    over = quality.parse_set(["attention_window=128", "titans_base_lr=0.03", "hope_cms_chunk_sizes=[32, 64]"])
    assert over == {"attention_window": 128, "titans_base_lr": 0.03, "hope_cms_chunk_sizes": [32, 64]}
    assert model_config("tiny", "swa", **over).attention_window == 128
    with pytest.raises(ValueError, match="KEY=VALUE"):
        quality.parse_set(["attention_window"])
    assert quality.main(["--layers", "swa", "--set", "atention_window=128", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "atention_window" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bench_quality_row_of_a_diverged_run(tmp_path):
    """A run whose loss became NaN (null in metrics.jsonl) gets a row with NaN train loss and a plot,
    not a crash of the whole comparison."""
    import argparse
    import json
    import math

    from bench import quality

    run = tmp_path / "runs" / "attention"
    run.mkdir(parents=True)
    rows = [{"step": 1, "loss": 9.0, "grad_norm": 2.0, "tokens_per_s": 100.0, "step_time_s": 1.0, "mem_gib": 1.0},
            {"step": 2, "loss": None, "grad_norm": None, "tokens_per_s": 100.0, "step_time_s": 1.0, "mem_gib": 1.0},
            {"step": 2, "val_loss": None}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(model="test", num_layers=2, vocab_size=0, set=[], seed=0, steps=2)
    row = quality.train_layer(args, "attention", tmp_path)  # finished: nothing trains
    assert row["steps_done"] == 2 and math.isnan(row["train_loss"]) and row["grad_norm_step1"] == 2.0
    assert quality.plot(tmp_path, ["attention"]).stat().st_size > 0
