"""plot: PNG figures of a sweep, one panel per memory-layer type.

    loss_vs_flops.png  final loss against training FLOPs (C = 6 N D) for each model size (points joined
                       by size), the fitted L(N, C / 6N) of each size (dashed) and the fitted
                       compute-optimal frontier min_N L(N, C / 6N) (black)
    isoflop.png        iso-FLOP curves: for a few budgets C, the fitted loss against N along D = C / 6N,
                       runs within a factor 1.5 of the budget as points, and the optimum N_opt(C) (star)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _frontier(fit, C):
    n, d = fit.compute_optimal(C)
    return fit.loss(n, d)


def plot_loss_vs_flops(df, fits: dict, path) -> Path:
    plt = _plt()
    groups = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, layer in zip(axes[0], groups):
        sub = df[df["layer"] == layer]
        cmap = plt.get_cmap("viridis")
        sizes = sorted(sub["size"].unique(), key=lambda s: sub[sub["size"] == s]["n_params"].iloc[0])
        c_lo, c_hi = sub["flops_6nd"].min() / 3, sub["flops_6nd"].max() * 3
        grid = np.geomspace(c_lo, c_hi, 200)
        fit = fits.get(layer)
        for k, size in enumerate(sizes):
            s = sub[sub["size"] == size].sort_values("flops_6nd")
            color = cmap(k / max(1, len(sizes) - 1))
            n = s["n_params"].iloc[0]
            ax.plot(s["flops_6nd"], s["loss"], "o-", color=color, label=f"{size} (N={n / 1e6:.2g}M)")
            if fit is not None:
                ax.plot(grid, fit.loss(n, grid / (6 * n)), "--", color=color, alpha=0.7)
        if fit is not None:
            ax.plot(grid, _frontier(fit, grid), "k-", lw=2,
                    label=f"frontier: E={fit.E:.2f}, α={fit.alpha:.2f}, β={fit.beta:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="final loss", title=layer)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_isoflop(df, fits: dict, path, budgets=None, tolerance: float = 1.5) -> Path:
    plt = _plt()
    groups = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, layer in zip(axes[0], groups):
        sub = df[df["layer"] == layer]
        fit = fits.get(layer)
        cs = budgets if budgets is not None else np.geomspace(sub["flops_6nd"].min(), sub["flops_6nd"].max(), 4)
        n_lo, n_hi = sub["n_params"].min() / 4, sub["n_params"].max() * 4
        cmap = plt.get_cmap("plasma")
        for k, C in enumerate(cs):
            color = cmap(k / max(1, len(cs)))
            near = sub[(sub["flops_6nd"] > C / tolerance) & (sub["flops_6nd"] < C * tolerance)]
            ax.plot(near["n_params"], near["loss"], "o", color=color)
            if fit is not None:
                n_opt, d_opt = fit.compute_optimal(C)
                n = np.geomspace(min(n_lo, n_opt / 4), max(n_hi, n_opt * 4), 200)
                ax.plot(n, fit.loss(n, C / (6 * n)), "-", color=color, label=f"C={C:.2g}")
                ax.plot([n_opt], [fit.loss(n_opt, d_opt)], "*", color=color, ms=14, mec="k")
        ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="loss", title=f"{layer}: iso-FLOP")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_all(df, fits: dict, out_dir, budgets=None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_loss_vs_flops(df, fits, out / "loss_vs_flops.png"), plot_isoflop(df, fits, out / "isoflop.png", budgets)]
