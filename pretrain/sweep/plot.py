"""plot: PNG figures of a sweep, one panel per memory-layer type; the fits come from fit.json.

    loss_vs_flops.png  the measured runs (final loss against training FLOPs C = 6 N D, one colour per
                       model size), each size's fitted L(N, C / 6N) and the fitted compute-optimal
                       frontier min_N L(N, C / 6N) (black)
    isoflop.png        the measured runs (loss against N, coloured by their C) and, for a few budgets C
                       in the measured range (or ``--budget``), the fitted loss along D = C / 6N with
                       its optimum N_opt(C) (star)

A fitted curve is solid where it interpolates (a size's curve over the FLOPs that size was run at; the
frontier and the iso-FLOP curves over the swept N) and dashed where it extrapolates. The axes frame
the measured runs: a curve leaving the frame is cut, never the data squashed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MARGIN = 1.15  # the loss axis spans the measured losses ×/÷ this
X_PAD = 3.0  # the FLOPs / N axis spans the measured range ×/÷ this


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _split(ax, x, y, inside, color, label=None, **kw):
    """Plots y(x) solid where ``inside`` and dashed elsewhere (extrapolation)."""
    y = np.where(np.isfinite(y), y, np.nan)
    ax.plot(x, np.where(inside, y, np.nan), "-", color=color, label=label, **kw)
    ax.plot(x, np.where(inside, np.nan, y), "--", color=color, **kw)


def _frame(ax, x, loss):
    """Axis limits around the measured points only."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    ax.set_xlim(x.min() / X_PAD, x.max() * X_PAD)
    ax.set_ylim(loss.min() / MARGIN, loss.max() * MARGIN)


def _panels(plt, df):
    groups = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
    return fig, list(zip(axes[0], groups))


def loss_vs_flops_figure(df, fits: dict):
    plt = _plt()
    fig, panels = _panels(plt, df)
    for ax, layer in panels:
        sub = df[df["layer"] == layer]
        fit = fits.get(layer)
        cmap = plt.get_cmap("viridis")
        sizes = sorted(sub["size"].unique(), key=lambda s: sub[sub["size"] == s]["n_params"].iloc[0])
        grid = np.geomspace(sub["flops_6nd"].min() / X_PAD, sub["flops_6nd"].max() * X_PAD, 300)
        for k, size in enumerate(sizes):
            s = sub[sub["size"] == size].sort_values("flops_6nd")
            color = cmap(k / max(1, len(sizes) - 1))
            n = s["n_params"].iloc[0]
            ax.plot(s["flops_6nd"], s["loss"], "o", color=color, ms=6, mec="k", mew=0.5, zorder=3,
                    label=f"{size} (N={n:.3g})")
            if fit is not None:
                inside = (grid >= s["flops_6nd"].min()) & (grid <= s["flops_6nd"].max())
                _split(ax, grid, fit.loss(n, grid / (6 * n)), inside, color, alpha=0.8, lw=1.2)
        if fit is not None:
            n_opt, d_opt = fit.compute_optimal(grid)
            inside = (n_opt >= sub["n_params"].min()) & (n_opt <= sub["n_params"].max())
            _split(ax, grid, fit.loss(n_opt, d_opt), inside, "k", lw=2,
                   label=f"fitted frontier (E={fit.E:.3g}, α={fit.alpha:.2f}, β={fit.beta:.2f})")
            ax.plot([], [], "k--", lw=1.2, label="dashed: extrapolated")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="final loss", title=layer)
        _frame(ax, sub["flops_6nd"], sub["loss"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def isoflop_figure(df, fits: dict, budgets=None):
    from matplotlib.colors import LogNorm

    plt = _plt()
    fig, panels = _panels(plt, df)
    cmap = plt.get_cmap("plasma")
    for ax, layer in panels:
        sub = df[df["layer"] == layer]
        fit = fits.get(layer)
        c = sub["flops_6nd"].to_numpy(float)
        cs = list(budgets) if budgets else list(np.geomspace(c.min(), c.max(), 4))
        norm = LogNorm(min(c.min(), *cs), max(c.max(), *cs) * 1.0001)
        points = ax.scatter(sub["n_params"], sub["loss"], c=c, cmap=cmap, norm=norm, s=36, edgecolors="k",
                            linewidths=0.5, zorder=3, label="measured runs")
        n_lo, n_hi = sub["n_params"].min(), sub["n_params"].max()
        n = np.geomspace(n_lo / X_PAD, n_hi * X_PAD, 300)
        if fit is not None:
            for C in cs:
                color = cmap(norm(C))
                n_opt, d_opt = (float(v) for v in fit.compute_optimal(C))
                shown = n_lo / X_PAD <= n_opt <= n_hi * X_PAD
                label = f"C={C:.2g}: " + (f"N_opt={n_opt:.2g}" + ("" if shown else " (off the plot)")
                                          if np.isfinite(n_opt) else "no finite N_opt")
                _split(ax, n, fit.loss(n, C / (6 * n)), (n >= n_lo) & (n <= n_hi), color, label=label, lw=1.5)
                if shown:
                    ax.plot([n_opt], [fit.loss(n_opt, d_opt)], "*", color=color, ms=14, mec="k", zorder=4)
            ax.plot([], [], "k--", lw=1.2, label="dashed: extrapolated")
        fig.colorbar(points, ax=ax, label="run's C = 6ND")
        ax.set(xscale="log", yscale="log", xlabel="parameters N (non-embedding)", ylabel="final loss",
               title=f"{layer}: iso-FLOP")
        _frame(ax, sub["n_params"], sub["loss"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path) -> Path:
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def plot_all(df, fits: dict, out_dir, budgets=None) -> list[Path]:
    """Writes OUT_DIR/loss_vs_flops.png and isoflop.png; ``fits``: layer → ScalingFit (may be empty)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_save(loss_vs_flops_figure(df, fits), out / "loss_vs_flops.png"),
            _save(isoflop_figure(df, fits, budgets), out / "isoflop.png")]
