"""collect: one table (CSV) of every run's final losses, tokens and FLOPs from its metrics.jsonl.

Columns: name, size, layer, n_params, n_params_total, steps (planned), steps_done, complete, tokens
(seen, from the last metrics line), final_val_loss (the last ``val_loss`` line), smoothed_train_loss
(mean of the last ``smooth`` fraction of the training losses), loss (the value the fit uses:
final_val_loss where there is one, else smoothed_train_loss), flops_6nd (6 · n_params · tokens) and
flops_logged (the training program's own count where it logs one: cumulative ``flops``, or
``flops_per_token`` × tokens).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .plan import load_manifest


def read_metrics(path) -> list[dict]:
    """The JSON lines of a metrics.jsonl (a line cut by a crash is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarize_run(run: dict, smooth: float = 0.1) -> dict:
    lines = read_metrics(Path(run["dir"]) / "metrics.jsonl")
    train = [r for r in lines if "loss" in r and math.isfinite(r["loss"])]
    val = [r for r in lines if "val_loss" in r]
    steps_done = max((r.get("step", 0) for r in lines), default=0)
    k = max(1, int(round(smooth * len(train))))
    smoothed = sum(r["loss"] for r in train[-k:]) / k if train else math.nan
    final_val = float(val[-1]["val_loss"]) if val else math.nan
    tokens = next((r["tokens"] for r in reversed(train) if "tokens" in r), None)
    if tokens is None:
        tokens = run["tokens"] * steps_done / run["steps"]
    flops_logged = next((r["flops"] for r in reversed(lines) if "flops" in r), None)
    if flops_logged is None:  # or a per-token count × tokens
        fpt = next((r["flops_per_token"] for r in reversed(lines) if "flops_per_token" in r), math.nan)
        flops_logged = fpt * float(tokens)
    return {
        "name": run["name"], "size": run["size"], "layer": run["layer"],
        "n_params": run["n_params"], "n_params_total": run["n_params_total"],
        "steps": run["steps"], "steps_done": steps_done, "complete": steps_done >= run["steps"],
        "tokens": float(tokens), "final_val_loss": final_val, "smoothed_train_loss": smoothed,
        "loss": final_val if math.isfinite(final_val) else smoothed,
        "flops_6nd": 6.0 * run["n_params"] * float(tokens), "flops_logged": float(flops_logged),
    }


def collect(sweep_dir, out: str | None = None, smooth: float = 0.1):
    """Writes SWEEP/results.csv (or ``out``) and returns the table as a pandas DataFrame."""
    import pandas as pd

    manifest = load_manifest(sweep_dir)
    df = pd.DataFrame([summarize_run(r, smooth) for r in manifest["runs"]])
    path = Path(out) if out else Path(sweep_dir) / "results.csv"
    df.to_csv(path, index=False)
    return df
