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

    # nothing trained yet: collect shows incomplete runs, fit finds nothing to fit, plot nothing to draw
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    capsys.readouterr()
    assert cli.main(["plot", "--sweep", str(sweep)]) == 2
    assert capsys.readouterr().err.startswith("error: no complete run with a finite loss to plot")
    params = (2.0, 40.0, 60.0, 0.4, 0.35)
    _fake_metrics(manifest, params)
    assert cli.main(["collect", "--sweep", str(sweep)]) == 0
    import pandas as pd

    df = pd.read_csv(sweep / "results.csv")
    assert df["complete"].all() and len(df) == 24
    assert np.allclose(df["loss"], df["final_val_loss"])
    assert np.allclose(df["flops_6nd"], 6 * df["n_params"] * df["tokens"])

    capsys.readouterr()
    assert cli.main(["plot", "--sweep", str(sweep)]) == 0  # no fit.json yet: the runs alone
    assert "plotting the measured runs only" in capsys.readouterr().err
    assert cli.main(["fit", "--sweep", str(sweep), "--bootstrap", "8", "--starts", "16", "--budget", "1e15"]) == 0
    out, err = capsys.readouterr()
    assert "ttt_linear: L =" in out and "C=1e+15: N_opt=" in out
    assert "warning" not in err, err  # the generating law's optimum lies inside the swept sizes
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


FAR = (2.0, 400.0, 20.0, 0.4, 0.35)  # a law whose compute-optimal N (~3e6) lies far above the swept 5e4–4e5


@pytest.fixture(scope="module")
def far_sweep(tmp_path_factory):
    """6 runs (3 sizes × 2 budgets) with metrics from FAR, collected and fitted (stdout, stderr kept)."""
    import contextlib
    import io

    sweep = tmp_path_factory.mktemp("far") / "sweep"
    assert cli.main(["plan", "--sweep", str(sweep), "--sizes", "64x1,64x2,128x2", "--tokens", "1e4,3e4",
                     "--seq-len", "64", "--micro-batch", "4"]) == 0
    _fake_metrics(json.loads((sweep / "sweep.json").read_text()), FAR, noise=0.0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["collect", "--sweep", str(sweep)]) == 0
        assert cli.main(["fit", "--sweep", str(sweep), "--bootstrap", "0", "--starts", "4", "--budget", "1e11"]) == 0
    return sweep, out.getvalue(), err.getvalue()


def test_fit_prints_d_over_n_and_warns_when_the_optimum_is_outside_the_swept_range(far_sweep):
    import re

    sweep, out, err = far_sweep
    doc = json.loads((sweep / "fit.json").read_text())["fits"]["ttt_linear"]
    (row,) = doc["compute_optimal"]
    ratio = row["D_opt"] / row["N_opt"]
    assert 1e-4 < ratio < 1e-2 and f"D/N={ratio:.3g}" in out, out  # was printed as D/N=0.0
    assert "(N_opt outside the swept N: extrapolated)" in out and row["N_opt_in_swept_range"] is False
    n_lo, n_hi = doc["swept"]["N"]
    assert row["N_opt"] > 4 * n_hi
    assert "warning: ttt_linear: the sweep does not bracket the compute-optimal model" in err, err
    sizes, ns = re.search(r"--sizes (\S+) \(N = ([^)]+)\)", err).groups()
    ns = [float(n) for n in ns.split(", ")]
    assert all(re.fullmatch(r"\d+x\d+", s) for s in sizes.split(",")) and len(ns) == len(sizes.split(","))
    assert min(ns) < row["N_opt"] < max(ns), err  # the suggested sizes bracket the optimum


def _line_data(line):
    x, y = (np.asarray(v, float) for v in line.get_data())
    keep = np.isfinite(y)
    return x[keep], y[keep]


def test_plot_draws_the_runs_and_the_saved_fits_framed_on_the_data(far_sweep, monkeypatch, capsys):
    import pandas as pd

    from pretrain.sweep import fit as fit_mod
    from pretrain.sweep.plot import isoflop_figure, loss_vs_flops_figure

    sweep, _, _ = far_sweep

    def no_refit(*a, **k):
        raise AssertionError("plot must read fit.json, not fit again")

    monkeypatch.setattr(fit_mod, "fit_chinchilla", no_refit)
    assert cli.main(["plot", "--sweep", str(sweep)]) == 0
    assert "warning" not in capsys.readouterr().err
    df = pd.read_csv(sweep / "results.csv")
    fits = load_fits(sweep / "fit.json")

    (ax,) = loss_vs_flops_figure(df, fits).axes
    (y0, y1), (x0, x1) = ax.get_ylim(), ax.get_xlim()
    assert y0 < df["loss"].min() and df["loss"].max() < y1 < 1.3 * df["loss"].max()  # the data, not the curves
    assert x0 < df["flops_6nd"].min() and df["flops_6nd"].max() < x1
    lines = ax.get_lines()
    for size, s in df.groupby("size"):  # the measured points
        assert any(l.get_marker() == "o" and sorted(_line_data(l)[0]) == sorted(s["flops_6nd"]) for l in lines), size
    solid = [_line_data(l) for l in lines if l.get_linestyle() == "-" and l.get_marker() == "None"]
    dashed = [_line_data(l) for l in lines if l.get_linestyle() == "--" and len(_line_data(l)[0])]
    assert solid and dashed
    assert max(y.max() for _, y in solid + dashed) > y1  # some fitted curve leaves the frame and is cut
    for size, s in df.groupby("size"):  # each size's solid fit covers exactly its measured FLOPs
        n = s["n_params"].iloc[0]
        pred = fits["ttt_linear"].loss(n, s["flops_6nd"] / (6 * n))
        np.testing.assert_allclose(pred, s["loss"], rtol=1e-3)
        assert any(len(x) and x.min() >= s["flops_6nd"].min() and x.max() <= s["flops_6nd"].max()
                   and np.allclose(y, fits["ttt_linear"].loss(n, x / (6 * n))) for x, y in solid), size

    fig = isoflop_figure(df, fits)
    ax = fig.axes[0]
    (pts,) = ax.collections  # every measured run, at (N, loss)
    assert sorted(map(tuple, pts.get_offsets().tolist())) == sorted(zip(df["n_params"], df["loss"]))
    (y0, y1) = ax.get_ylim()
    assert y0 < df["loss"].min() and df["loss"].max() < y1 < 1.3 * df["loss"].max()
    assert any("off the plot" in t.get_text() for t in ax.get_legend().get_texts())  # N_opt ≈ 3e6 is beyond


def test_fit_and_plot_of_a_degenerate_law(far_sweep, tmp_path, monkeypatch, capsys):
    """A law with a negative exponent (as 6 noisy CPU runs can give) has no compute-optimal N: fit says
    so instead of calling a NaN extrapolated, and plot still draws the runs and the per-size fits."""
    import shutil

    from pretrain.sweep.fit import ScalingFit

    sweep = tmp_path / "sweep"
    shutil.copytree(far_sweep[0], sweep)
    degenerate = ScalingFit(E=5.5, A=0.31, B=2.9e-4, alpha=1.64, beta=-0.73, n_points=6)
    monkeypatch.setattr(cli, "_fits_for", lambda df, args: {"ttt_linear": degenerate})
    capsys.readouterr()
    assert cli.main(["fit", "--sweep", str(sweep), "--budget", "1e11"]) == 0
    out, err = capsys.readouterr()
    assert "N_opt=nan" in out and "(no compute-optimal N: the fitted law has a non-positive" in out, out
    assert "warning" not in err, err
    assert cli.main(["plot", "--sweep", str(sweep)]) == 0
    assert (sweep / "plots" / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
