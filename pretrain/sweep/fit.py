"""Chinchilla scaling-law fit: L(N, D) = E + A / N^α + B / D^β  (Hoffmann et al. 2022, approach 3).

Parameterised as in the paper with a = log A, b = log B, e = log E, so that

    log L̂(N, D) = LSE(a − α log N,  b − β log D,  e)

and fitted by minimising Σ Huber_δ(log L̂ − log L) with δ = 1e-3 (robust to a few bad runs) with
L-BFGS (scipy, analytic gradient) over a grid of initialisations (the paper's: a, b ∈ {0, 5, …, 25},
e ∈ {−1, −0.5, …, 1}, α, β ∈ {0, 0.5, …, 2}): the objective is evaluated at all 4500 grid points at
once, L-BFGS starts from the best ``starts`` (64) of them, and the best local optimum wins.
Confidence intervals come from a bootstrap over runs: each resample is refitted (from the full-data
optimum and the ``boot_starts`` best grid points on that resample) and the percentiles reported.

Compute: C ≈ 6 N D training FLOPs (2 FLOPs per multiply-add × 3 for forward + backward, N the
parameters in the matrix multiplies, attention/scan terms ignored; pretrain.metrics counts the
exact per-layer-type FLOPs and `collect` keeps that too). Minimising L(N, C / 6N) over N gives

    N_opt(C) = G (C/6)^{β/(α+β)},   D_opt(C) = G⁻¹ (C/6)^{α/(α+β)},   G = (αA / βB)^{1/(α+β)}.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
DEFAULT_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                    alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


def _huber(r: np.ndarray, delta: float):
    """Huber loss and its derivative, elementwise."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return loss, grad


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * logN, b - beta * logD
    m = np.maximum(np.maximum(t0, t1), e)
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = w0 + w1 + w2
    pred = m + np.log(s)  # log-sum-exp of the three terms
    r = pred - logL
    small = np.abs(r) <= delta
    g = np.where(small, r, delta * np.sign(r)) / s  # Huber derivative × softmax normaliser
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    gw0, gw1 = g * w0, g * w1
    grad = np.array([gw0.sum(), gw1.sum(), (g * w2).sum(), -(gw0 @ logN), -(gw1 @ logD)])
    return loss, grad


def _grid_objective(thetas: np.ndarray, logN, logD, logL, delta) -> np.ndarray:
    """Objective at many parameter vectors at once (for screening the grid), shape (k,)."""
    a, b, e, al, be = (thetas[:, i:i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - al * logN, b - be * logD), e)
    return _huber(pred - logL, delta)[0].sum(axis=1)


def _grid(grid: dict) -> np.ndarray:
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)


def _lbfgs(starts: np.ndarray, logN, logD, logL, delta) -> tuple[np.ndarray, float]:
    best, best_f = None, np.inf
    for x0 in starts:
        res = minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                       options=dict(maxiter=500, gtol=1e-9, ftol=1e-12))
        if np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best, best_f


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = 0.0
    n_points: int = 0
    ci: dict = field(default_factory=dict)  # name -> [low, high] (bootstrap percentiles)
    bootstrap: int = 0

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L under C = 6 N D."""
        return compute_optimal(self.as_tuple(), C)

    def as_tuple(self):
        return (self.E, self.A, self.B, self.alpha, self.beta)

    def to_dict(self) -> dict:
        return asdict(self)


def compute_optimal(params, C):
    E, A, B, alpha, beta = params
    C = np.asarray(C, float)
    if min(A, B, alpha, beta) <= 0:  # no finite optimum (a degenerate fit, e.g. of a bootstrap resample)
        return np.full_like(C, np.nan), np.full_like(C, np.nan)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    N = G * (C / 6.0) ** (beta / (alpha + beta))
    return N, C / (6.0 * N)


def _params(theta) -> tuple:
    a, b, e, alpha, beta = theta
    return (float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta))


def fit_chinchilla(N, D, L, *, delta: float = HUBER_DELTA, grid: dict | None = None, starts: int = 64,
                   bootstrap: int = 0, boot_starts: int = 4, ci: float = 0.95, budgets=(), seed: int = 0) -> ScalingFit:
    """Fits E, A, B, α, β to losses L of runs with N parameters trained on D tokens.

    L-BFGS runs from the ``starts`` grid points with the lowest objective (the whole grid is screened
    in one vectorised pass; ``starts=0`` runs L-BFGS from every point, as the paper did: ~4500 runs).
    ``bootstrap`` > 0 adds percentile confidence intervals (``ci``) of the parameters and, for every
    compute budget in ``budgets``, of N_opt and D_opt (keys ``N_opt@C`` / ``D_opt@C``).
    """
    N, D, L = (np.asarray(x, float).ravel() for x in (N, D, L))
    if not (len(N) == len(D) == len(L)) or len(N) < 5:
        raise ValueError(f"need ≥ 5 runs with N, D and loss to fit 5 parameters, got {len(L)}")
    if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0) or not np.all(np.isfinite(L)):
        raise ValueError("N, D and the losses must be positive and finite")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    points = _grid(grid or DEFAULT_GRID)
    order = np.argsort(_grid_objective(points, logN, logD, logL, delta))
    theta, f = _lbfgs(points[order[:starts] if starts > 0 else order], logN, logD, logL, delta)
    out = ScalingFit(*_params(theta), objective=f, n_points=len(L))
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(L), len(L))
            args = (logN[idx], logD[idx], logL[idx], delta)
            screened = points[np.argsort(_grid_objective(points, *args))[:boot_starts]]
            th, _ = _lbfgs(np.vstack([theta[None], screened]), *args)
            p = _params(th)
            row = dict(zip(PARAM_NAMES, p))
            for C in budgets:
                n_opt, d_opt = compute_optimal(p, C)
                row[f"N_opt@{C:g}"], row[f"D_opt@{C:g}"] = float(n_opt), float(d_opt)
            samples.append(row)
        lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
        out.ci = {k: [float(np.nanpercentile([s[k] for s in samples], lo)),
                      float(np.nanpercentile([s[k] for s in samples], hi))] for k in samples[0]}
        out.bootstrap = bootstrap
    return out


def unbracketed(fit: ScalingFit, n_range, c_range, budgets=(), factor: float = 2.0) -> list[tuple[float, float]]:
    """(C, N_opt) where the sweep does not bracket the compute-optimal model: N_opt(C) lies more than
    ``factor`` outside the swept N range, for the largest swept compute and for each budget C within
    ``factor`` of the swept compute range (far beyond it, N_opt outside the range is the point of
    extrapolating). Such an N_opt is an extrapolation of the fit: sizes near it belong in the sweep."""
    (n_lo, n_hi), (c_lo, c_hi) = n_range, c_range
    out = []
    for C in sorted({float(c_hi), *(float(c) for c in budgets if c_lo / factor <= c <= c_hi * factor)}):
        n_opt = float(fit.compute_optimal(C)[0])
        if np.isfinite(n_opt) and not n_lo / factor <= n_opt <= n_hi * factor:
            out.append((C, n_opt))
    return out


def synthetic_losses(params, N, D, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Losses from known (E, A, B, α, β) with multiplicative log-normal noise (for tests)."""
    E, A, B, alpha, beta = params
    L = E + A / np.asarray(N, float) ** alpha + B / np.asarray(D, float) ** beta
    return L * np.exp(noise * np.random.default_rng(seed).standard_normal(np.shape(L)))


def save_fits(fits: dict, budgets, path, swept: dict | None = None) -> dict:
    """fit.json: per group the parameters, CIs and compute-optimal N, D for each budget; with ``swept``
    (group -> {"N": [lo, hi], "C": [lo, hi]}, the measured ranges) also those ranges and, per budget,
    whether N_opt lies inside the swept N range."""
    doc = {}
    for group, fit in fits.items():
        d = fit.to_dict()
        rng = (swept or {}).get(group)
        if rng:
            d["swept"] = rng
        d["compute_optimal"] = []
        for C in budgets:
            n, dd = fit.compute_optimal(C)
            row = {"C": C, "N_opt": float(n), "D_opt": float(dd), "loss": float(fit.loss(n, dd))}
            if rng:
                row["N_opt_in_swept_range"] = bool(rng["N"][0] <= n <= rng["N"][1])
            if f"N_opt@{C:g}" in fit.ci:
                row["N_opt_ci"], row["D_opt_ci"] = fit.ci[f"N_opt@{C:g}"], fit.ci[f"D_opt@{C:g}"]
            d["compute_optimal"].append(row)
        doc[group] = d
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"flop_model": "C = 6 N D", "form": "L = E + A/N^alpha + B/D^beta", "fits": doc}, f, indent=2)
    return doc


def load_fits(path) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    names = {f.name for f in fields(ScalingFit)}
    return {g: ScalingFit(**{k: v for k, v in d.items() if k in names}) for g, d in doc["fits"].items()}
