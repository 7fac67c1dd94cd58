"""Scaling-law sweep tooling: the fit recovers known parameters; plan → collect → fit → plot on
synthetic metrics (no training); the plots are valid PNGs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pretrain.sweep import __main__ as cli
from pretrain.sweep.fit import compute_optimal, fit_chinchilla, load_fits, synthetic_losses

TRUE = (1.69, 406.4, 410.7, 0.34, 0.28)  # Hoffmann et al.'s fitted values


def _grid(n=6):
    N, D = np.meshgrid(np.geomspace(1e6, 1e9, n), np.geomspace(1e8, 1e11, n))
    return N.ravel(), D.ravel()


def test_fit_recovers_known_parameters_exactly():
    N, D = _grid()
    fit = fit_chinchilla(N, D, synthetic_losses(TRUE, N, D), starts=16)
    got = fit.as_tuple()
    np.testing.assert_allclose(got, TRUE, rtol=2e-3)


def test_fit_with_noise_and_outliers_and_bootstrap():
    N, D = _grid()
    L = synthetic_losses(TRUE, N, D, noise=0.003, seed=1)
    L[[3, 17]] *= 1.3  # two broken runs: the Huber loss keeps them from dragging the fit
    fit = fit_chinchilla(N, D, L, starts=16, bootstrap=12, boot_starts=2, budgets=[1e21])
    E, A, B, alpha, beta = fit.as_tuple()
    assert abs(alpha - TRUE[3]) < 0.02 and abs(beta - TRUE[4]) < 0.02 and abs(E - TRUE[0]) < 0.05
    for k in ("E", "A", "B", "alpha", "beta", "N_opt@1e+21", "D_opt@1e+21"):
        lo, hi = fit.ci[k]
        assert lo <= hi
    n_true, d_true = compute_optimal(TRUE, 1e21)
    n_fit, d_fit = fit.compute_optimal(1e21)
    assert abs(math.log(n_fit / n_true)) < 0.25 and abs(math.log(d_fit / d_true)) < 0.25
    assert n_fit * d_fit * 6 == pytest.approx(1e21)


def test_compute_optimal_is_the_minimum_along_the_budget():
    C = 1e20
    n_opt, d_opt = compute_optimal(TRUE, C)
    n = np.geomspace(n_opt / 10, n_opt * 10, 2001)
    E, A, B, a, b = TRUE
    loss = E + A / n**a + B / (C / (6 * n)) ** b
    assert abs(math.log(n[np.argmin(loss)] / n_opt)) < 0.01


def test_fit_rejects_too_few_or_bad_points():
    with pytest.raises(ValueError, match="need ≥ 5"):
        fit_chinchilla([1e6] * 3, [1e9] * 3, [3.0] * 3)
    with pytest.raises(ValueError, match="positive"):
        fit_chinchilla([1e6] * 6, [1e9] * 6, [3.0] * 5 + [-1.0])


def _fake_metrics(manifest, params, noise=0.002, val=True):
    """Writes metrics.jsonl of every planned run as if trained: loss decays to L(N, D)."""
    rng = np.random.default_rng(0)
    for r in manifest["runs"]:
        final = synthetic_losses(params, r["n_params"], r["tokens"])
        lines = []
        for s in range(1, r["steps"] + 1):
            lines.append({"step": s, "loss": float(final * (1 + 2.0 / s) * (1 + noise * rng.standard_normal())),
                          "lr": 1e-3, "grad_norm": 1.0, "tokens": r["tokens"] * s // r["steps"], "tokens_per_s": 1.0})
        if val:
            lines.append({"step": r["steps"], "val_loss": float(final), "val_ppl": float(np.exp(final))})
        with open(f"{r['dir']}/metrics.jsonl", "w") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))


def test_plan_collect_fit_plot(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1,64x2,128x2,192x3",
                     "--tokens", "1e4,3e4,1e5", "--layers", "ttt_linear,attention", "--seq-len", "64",
                     "--micro-batch", "4", "--nproc", "2"]) == 0
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert len(manifest["runs"]) == 24 and (sweep / "runs.txt").read_text().count("\n") == 24
    run = manifest["runs"][0]
    cfg = json.loads((sweep / "runs" / run["name"] / "train_config.json").read_text())
    assert cfg["steps"] == math.ceil(1e4 / (64 * 4 * 2)) and cfg["out"] == run["dir"]
    from pretrain.config import TrainConfig, load_config_file

    TrainConfig(**load_config_file(run["config"])).validate()  # a valid training-program config
    from transformers import AutoConfig

    import models  # noqa: F401 - registers memory_lm

    assert AutoConfig.from_pretrained(cfg["model"]).memory_layer == "ttt_linear"
    attn = next(r for r in manifest["runs"] if r["layer"] == "attention")
    assert AutoConfig.from_pretrained(json.loads(open(attn["config"]).read())["model"]).mixer_types == ["attention"]
    sizes = {r["size"]: r["n_params"] for r in manifest["runs"] if r["layer"] == "ttt_linear"}
    assert sizes["64x1"] < sizes["64x2"] < sizes["128x2"] < sizes["192x3"]

    # nothing trained yet: collect shows incomplete runs, fit finds nothing to fit
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    params = (2.0, 40.0, 60.0, 0.4, 0.35)
    _fake_metrics(manifest, params)
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    import pandas as pd

    df = pd.read_csv(sweep / "results.csv")
    assert df["complete"].all() and len(df) == 24
    assert np.allclose(df["loss"], df["final_val_loss"])
    assert np.allclose(df["flops_6nd"], 6 * df["n_params"] * df["tokens"])

    capsys.readouterr()
    assert cli.main(["fit", "--sweep", str(sweep), "--bootstrap", "8", "--starts", "16", "--budget", "1e15"]) == 0
    out = capsys.readouterr().out
    assert "ttt_linear: L =" in out and "C=1e+15: N_opt=" in out
    fits = load_fits(sweep / "fit.json")
    for layer in ("ttt_linear", "attention"):
        # the fit reproduces the generating law over the sweep's range
        sub = df[df["layer"] == layer]
        pred = fits[layer].loss(sub["n_params"], sub["tokens"])
        np.testing.assert_allclose(pred, sub["loss"], rtol=2e-3)
    doc = json.loads((sweep / "fit.json").read_text())
    assert doc["fits"]["attention"]["compute_optimal"][0]["N_opt_ci"][0] > 0

    assert cli.main(["plot", "--sweep", str(sweep)]) == 0
    import matplotlib.image as mpimg

    for name in ("loss_vs_flops.png", "isoflop.png"):
        png = sweep / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # not blank


def test_plan_rejects_unknown_layer_and_size(tmp_path, capsys):
    assert cli.main(["plan", "--sweep", str(tmp_path / "a"), "--sizes", "tiny", "--tokens", "1e4",
                     "--layers", "no_such_layer"]) == 2
    assert "not implemented" in capsys.readouterr().err
    assert cli.main(["plan", "--sweep", str(tmp_path / "b"), "--sizes", "100x2", "--tokens", "1e4"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


PLAN = ["--sizes", "64x1,64x2", "--tokens", "1e4,3e4", "--seq-len", "64", "--micro-batch", "4"]


def test_refused_plan_leaves_nothing_behind(tmp_path, capsys):
    """A size refused after others were fine (96 is no multiple of 64) writes nothing: no sweep folder,
    no temporary folder; re-planning an existing sweep with it leaves that sweep as it was."""
    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1,64x2,96x2", "--tokens", "1e4"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["plan", "--sweep", str(sweep), *PLAN]) == 0
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    assert cli.main(["plan", "--sweep", str(sweep), *PLAN, "--lr", "5e-3", "--layers", "ttt_linear,nope", "--overwrite"]) == 2
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_plan_failing_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    from pretrain.sweep import plan as plan_mod

    real, calls = plan_mod.write_model, []

    def flaky(config, folder, seed):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(config, folder, seed)

    monkeypatch.setattr(plan_mod, "write_model", flaky)
    with pytest.raises(OSError, match="disk full"):
        plan_mod.plan(tmp_path / "sweep", ["64x1", "64x2"], [10_000], ["ttt_linear"], seq_len=64, micro_batch=4)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_replan_overwrite_keeps_the_runs_outputs(tmp_path):
    sweep = tmp_path / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), *PLAN]) == 0
    run = json.loads((sweep / "sweep.json").read_text())["runs"][0]
    (Path(run["dir"]) / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert cli.main(["plan", "--sweep", str(sweep), *PLAN, "--lr", "5e-3", "--overwrite"]) == 0
    cfg = json.loads(Path(run["config"]).read_text())
    assert cfg["lr"] == 5e-3 and cfg["precision"] == "auto"  # decided where the run runs: fp32 on CPU, bf16 on GPU
    assert (Path(run["dir"]) / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in (sweep / "models").iterdir()) == ["ttt_linear-64x1", "ttt_linear-64x2"]
