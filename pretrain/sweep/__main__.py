"""Scaling-law sweeps: ``python -m pretrain.sweep {plan,submit,collect,fit,plot} --sweep DIR ...``.

    plan     write the grid (sizes × token budgets × memory layers) as run configs under DIR
    submit   run them: a Slurm job array (slurm/sweep.sh, --max-concurrent K) or --local one after another
    collect  DIR/results.csv: final/smoothed losses, tokens, FLOPs of every run
    fit      DIR/fit.json: L(N, D) = E + A/N^α + B/D^β per memory layer, bootstrap CIs, compute-optimal N, D
    plot     DIR/plots/loss_vs_flops.png and isoflop.png

See docs/cluster.md (section "Scaling-law sweeps") and the modules' docstrings.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _fits_for(df, args):
    from .fit import fit_chinchilla

    fits = {}
    for layer, sub in _usable(df, args.include_incomplete).groupby("layer"):
        if len(sub) < 5:
            print(f"{layer}: {len(sub)} usable runs, need ≥ 5 to fit; skipped", file=sys.stderr)
            continue
        fits[layer] = fit_chinchilla(sub["n_params"], sub["tokens"], sub["loss"], starts=args.starts,
                                     bootstrap=args.bootstrap, budgets=args.budget, seed=args.seed)
    return fits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("plan", help="write the grid of run configs")
    pp.add_argument("--sweep", required=True, help="sweep directory (on shared storage for Slurm)")
    pp.add_argument("--sizes", required=True, type=_csv_list, help="presets or WIDTHxDEPTH, e.g. test,128x2,tiny")
    pp.add_argument("--tokens", required=True, help="training-token budgets, e.g. 2e5,4e5,8e5")
    pp.add_argument("--layers", default="ttt_linear", type=_csv_list, help="memory-layer types, e.g. ttt_linear,ttt_mlp")
    pp.add_argument("--data", default="synthetic", help="--data of every run")
    pp.add_argument("--seq-len", type=int, default=128, help="--seq-len of every run (default: 128)")
    pp.add_argument("--micro-batch", type=int, default=8, help="--micro-batch of every run (default: 8)")
    pp.add_argument("--grad-accum", type=int, default=1, help="--grad-accum of every run (default: 1)")
    pp.add_argument("--nproc", type=int, default=1, help="processes (data-parallel ranks) per run")
    pp.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run (default: 1e-3)")
    pp.add_argument("--schedule", default="cosine", choices=["cosine", "wsd"], help="learning-rate schedule (default: cosine)")
    pp.add_argument("--eval-every", type=int, default=0, help="0 = once, at the end")
    pp.add_argument("--save-every", type=int, default=0, help="0 = a quarter of the run")
    pp.add_argument("--seed", type=int, default=0, help="--seed of every run (default: 0)")
    pp.add_argument("--base-model", default="tiny", help="preset giving vocabulary etc. to WIDTHxDEPTH sizes")
    pp.add_argument("--vocab-size", type=int, default=0, help="model vocabulary (default: --base-model's); ≥ the data's")
    pp.add_argument("--base-config", help="training settings file every run starts from")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing plan in --sweep")

    ps = sub.add_parser("submit", help="run the pending runs (Slurm job array, or --local)")
    ps.add_argument("--sweep", required=True, help="sweep directory made by plan")
    ps.add_argument("--local", action="store_true", help="run here, one after another")
    ps.add_argument("--max-concurrent", type=int, default=4, help="array tasks running at once (Slurm)")
    ps.add_argument("--nproc", type=int, default=None, help="processes per run (default: the plan's)")
    ps.add_argument("sbatch_args", nargs="*", help="after --: more sbatch options (partition, account, time, ...)")

    pc = sub.add_parser("collect", help="gather every run's losses/tokens/FLOPs into results.csv")
    pc.add_argument("--sweep", required=True, help="sweep directory made by plan")
    pc.add_argument("--out", help="CSV path (default SWEEP/results.csv)")
    pc.add_argument("--smooth", type=float, default=0.1, help="fraction of the last training losses averaged")

    for name, help_ in (("fit", "fit L(N, D) per memory layer; compute-optimal N, D"), ("plot", "write PNG plots")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--sweep", required=True, help="sweep directory made by plan")
        q.add_argument("--csv", help="results table (default SWEEP/results.csv; collected if missing)")
        q.add_argument("--budget", type=float, action="append", default=None,
                       help="compute budget C in FLOPs (repeatable; default 1e18, 1e20, 1e22)")
        q.add_argument("--bootstrap", type=int, default=100 if name == "fit" else 0, help="bootstrap resamples")
        q.add_argument("--starts", type=int, default=64, help="L-BFGS starts from the best grid points (0 = all)")
        q.add_argument("--include-incomplete", action="store_true", help="also use runs that did not finish")
        q.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")

    args = p.parse_args(argv)
    from .plan import PlanError

    try:
        return _run(args)
    except (PlanError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    sweep = Path(args.sweep)
    if args.cmd == "plan":
        from .plan import _parse_tokens, plan

        m = plan(sweep, args.sizes, _parse_tokens(args.tokens), args.layers, data=args.data, seq_len=args.seq_len,
                 micro_batch=args.micro_batch, grad_accum=args.grad_accum, nproc=args.nproc, lr=args.lr,
                 schedule=args.schedule, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                 base_model=args.base_model, vocab_size=args.vocab_size, base_config=args.base_config, overwrite=args.overwrite)
        for r in m["runs"]:
            print(f"{r['name']:<36} N={r['n_params']:>12,}  D={r['tokens']:>14,}  steps={r['steps']:>7}  "
                  f"C=6ND={r['flops_6nd']:.3g}")
        print(f"{len(m['runs'])} runs planned in {sweep}")
        return 0
    if args.cmd == "submit":
        from .submit import submit_local, submit_slurm

        if args.local:
            failed = submit_local(sweep, args.nproc)
            return 1 if failed else 0
        submit_slurm(sweep, args.max_concurrent, args.nproc, args.sbatch_args)
        return 0
    if args.cmd == "collect":
        from .collect import collect

        df = collect(sweep, args.out, args.smooth)
        print(df.to_string(index=False))
        return 0

    import pandas as pd

    from .collect import collect

    csv = Path(args.csv) if args.csv else sweep / "results.csv"
    df = pd.read_csv(csv) if csv.is_file() else collect(sweep)
    if args.cmd == "fit":
        return _fit(args, sweep, df)
    return _plot(args, sweep, df)


def _usable(df, include_incomplete: bool):
    return df if include_incomplete else df[df["complete"] & df["loss"].map(math.isfinite)]


def _fit(args, sweep: Path, df) -> int:
    from .fit import save_fits

    budgets = args.budget or [1e18, 1e20, 1e22]
    args.budget = budgets
    fits = _fits_for(df, args)
    swept = {}
    for layer in fits:
        sub = _usable(df[df["layer"] == layer], args.include_incomplete)
        swept[layer] = {"N": [float(sub["n_params"].min()), float(sub["n_params"].max())],
                        "C": [float(sub["flops_6nd"].min()), float(sub["flops_6nd"].max())]}
    doc = save_fits(fits, budgets, sweep / "fit.json", swept)
    for layer, d in doc.items():
        ci = d["ci"]
        fmt = lambda k: f"{d[k]:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "")  # noqa: E731
        print(f"{layer}: L = {fmt('E')} + {fmt('A')}/N^{fmt('alpha')} + {fmt('B')}/D^{fmt('beta')}  "
              f"({d['n_points']} runs; swept N {d['swept']['N'][0]:.3g}–{d['swept']['N'][1]:.3g})")
        for row in d["compute_optimal"]:
            where = "" if row["N_opt_in_swept_range"] else "  (N_opt outside the swept N: extrapolated)"
            if not math.isfinite(row["N_opt"]):
                where = "  (no compute-optimal N: the fitted law has a non-positive coefficient or exponent)"
            print(f"  C={row['C']:.3g}: N_opt={row['N_opt']:.3g}  D_opt={row['D_opt']:.3g}  "
                  f"D/N={row['D_opt'] / row['N_opt']:.3g}  loss={row['loss']:.4f}{where}")
        _warn_unbracketed(sweep, df, layer, fits[layer], d["swept"], budgets)
    print(f"wrote {sweep / 'fit.json'}")
    return 0 if fits else 1


def _warn_unbracketed(sweep: Path, df, layer: str, fit, swept: dict, budgets) -> None:
    """A warning (stderr) when the sweep does not bracket the compute-optimal N, with sizes to add."""
    import re

    from .fit import unbracketed
    from .plan import load_manifest, suggest_sizes

    bad = unbracketed(fit, swept["N"], swept["C"], budgets)
    if not bad:
        return
    n_lo, n_hi = swept["N"]
    where = "; ".join(f"C={c:.3g}: N_opt={n:.3g}" for c, n in bad)
    targets = sorted({t for _, n in bad for t in (n / 2, n, 2 * n)})
    sizes = ""
    try:  # WIDTHxDEPTH sizes shaped like the sweep's largest one
        manifest = load_manifest(sweep)
        sub = df[df["layer"] == layer].sort_values("n_params")
        shapes = [re.fullmatch(r"(\d+)x(\d+)", str(s)) for s in sub["size"]]
        shapes = [m for m in shapes if m]
        aspect = int(shapes[-1].group(1)) / int(shapes[-1].group(2)) if shapes else 64.0
        found = suggest_sizes(targets, layer, manifest.get("base_model", "tiny"), manifest.get("vocab_size", 0), aspect)
        sizes = f": e.g. --sizes {','.join(s for s, _ in found)} (N = {', '.join(f'{n:.2g}' for _, n in found)})"
    except Exception as exc:  # noqa: BLE001 - the warning stands without the suggestion
        sizes = f" (no size suggestion: {exc})".splitlines()[0]
    print(f"warning: {layer}: the sweep does not bracket the compute-optimal model ({where}; swept N "
          f"{n_lo:.3g}–{n_hi:.3g}): N_opt is an extrapolation of the fit. Add sizes around "
          f"{', '.join(f'{t:.2g}' for t in targets)} parameters{sizes}", file=sys.stderr)


def _plot(args, sweep: Path, df) -> int:
    """Draws the measured runs and the fits saved in fit.json (never refits)."""
    from .fit import load_fits
    from .plot import plot_all

    data = _usable(df, args.include_incomplete)
    data = data[data["loss"].map(math.isfinite)]
    if data.empty:
        raise ValueError("no complete run with a finite loss to plot (`submit` and `collect` first, or --include-incomplete)")
    path = sweep / "fit.json"
    fits = {}
    if path.is_file():
        fits = load_fits(path)
        for layer, fit in fits.items():
            n = int((data["layer"] == layer).sum())
            if n != fit.n_points:
                print(f"warning: {layer}: fit.json was fitted to {fit.n_points} runs, {n} are usable now: "
                      f"re-run `fit` to update it", file=sys.stderr)
    else:
        print(f"note: no {path}: plotting the measured runs only (run `fit` to draw the fits)", file=sys.stderr)
    for out in plot_all(data, fits, sweep / "plots", budgets=args.budget):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
