"""bench.layer --interleave and bench.memory at toy sizes: they run, and report every row asked for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOY = ["--hidden", "32", "--heads", "2", "--mini-batch", "4"]


def _json_rows(args):
    res = subprocess.run([sys.executable, "-m", *args, "--json"], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


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
