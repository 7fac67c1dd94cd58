"""Training quality of layer types at one budget: the same model with one mixer type at a time.

    python -m bench.quality --layers attention,gated_deltanet,titans --steps 150 --out runs/quality
    python -m bench.quality --layers swa --set attention_window=128 --steps 150 --out runs/quality_swa128
    python -m bench.quality --layers attention,titans --model test --num-layers 2 --seq-len 32 \\
        --micro-batch 2 --steps 3 --data synthetic --vocab-size 256 --recall-lengths 32 --out /tmp/q   # a toy check

Each layer type gets a model from ``pretrain.sweep.plan`` (the ``--model`` preset's sizes and its
family defaults, ``--num-layers`` blocks, initialised with ``--seed``), trained by ``pretrain.train``
(fp32, cosine schedule, validation every ``--eval-every`` steps), exported by ``pretrain.export``
and scored on MQAR and passkey recall at ``--recall-lengths`` by ``pretrain.evaluate``. OUT gets:

* ``runs/LAYER/`` (the training run; re-running the command resumes or skips finished runs),
* ``results.csv`` / ``results.md``: parameters, step-1 gradient norm, final train loss (mean of the
  last 10 % of the steps), last validation loss, median tokens/s, time in training steps (wall_s),
  peak memory, recall,
* ``loss_curves.png``: the train loss (smoothed) and the validation loss of all layers.

A layer whose training fails gets its error in the table and does not stop the others.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

COLUMNS = ["layer", "params", "params_total", "steps_done", "grad_norm_step1", "train_loss", "val_loss",
           "tokens_per_s", "wall_s", "peak_mem_gib", "error"]


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` config fields (VALUE read as JSON, else kept as a string): ``titans_base_lr=0.03``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def model_overrides(args) -> dict:
    return {**({"num_hidden_layers": args.num_layers} if args.num_layers else {}),
            **({"vocab_size": args.vocab_size} if args.vocab_size else {}), **parse_set(args.set)}


def train_layer(args, layer: str, out: Path) -> dict:
    """Writes the initial model, trains it (resuming an unfinished run) and returns its row."""
    from pretrain.sweep.collect import read_metrics
    from pretrain.sweep.plan import model_config, write_model

    cfg = model_config(args.model, layer, **model_overrides(args))
    model_dir, run_dir = out / "models" / layer, out / "runs" / layer
    params = write_model(cfg, model_dir, args.seed) if not (model_dir / "config.json").is_file() else None
    if params is None:
        from pretrain.sweep.plan import count_params
        from models import MemoryLMForCausalLM

        params = count_params(MemoryLMForCausalLM(cfg))
    row = {"layer": layer, "params": params[0], "params_total": params[1], "error": ""}
    done = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if not done or done[-1]["step"] < args.steps:
        cmd = [sys.executable, "-m", "pretrain.train", "--model", str(model_dir), "--out", str(run_dir),
               "--data", args.data, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
               "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--schedule", "cosine",
               "--warmup", str(args.warmup if args.warmup >= 0 else max(1, args.steps // 10)),
               "--precision", "fp32", "--seed", str(args.seed), "--eval-every", str(args.eval_every or args.steps),
               "--eval-batches", str(args.eval_batches), "--save-every", str(max(1, args.steps // 5)),
               "--keep-checkpoints", "1",
               "--no-tensorboard", "--log-every", str(max(1, args.steps // 10))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env.setdefault("DS_ACCELERATOR", "cpu")
        print(f"[{layer}] training: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            row["error"] = (lines[-1] if lines else f"exit status {res.returncode}")[:200]
    lines = read_metrics(run_dir / "metrics.jsonl")
    train = [{**r, "loss": math.nan if r["loss"] is None else r["loss"]} for r in lines if "loss" in r]  # NaN: null
    val = [r for r in lines if "val_loss" in r]
    if train:
        k = max(1, len(train) // 10)
        tps = [r["tokens_per_s"] for r in train[2:]] or [r["tokens_per_s"] for r in train]
        row.update(steps_done=train[-1]["step"], grad_norm_step1=train[0].get("grad_norm", math.nan),
                   train_loss=sum(r["loss"] for r in train[-k:]) / k, tokens_per_s=statistics.median(tps),
                   wall_s=sum(r.get("step_time_s", 0.0) for r in train),  # the steps' time (resumes add up)
                   peak_mem_gib=max(r.get("mem_gib", 0.0) for r in train))
    row["val_loss"] = val[-1]["val_loss"] if val else math.nan
    return row


def recall(args, out: Path, layers: list[str]) -> list[dict]:
    """MQAR / passkey recall of every trained layer (exported from its last checkpoint)."""
    from pretrain import evaluate, export

    folders = []
    for layer in layers:
        folder = out / "export" / layer
        if export.main([str(out / "runs" / layer), str(folder), "--overwrite"]) == 0:
            folders.append(folder)
    if not folders:
        return []
    eval_dir = out / "eval"
    argv = [*map(str, folders), "--names", ",".join(f.name for f in folders), "--tasks", "mqar,passkey",
            "--lengths", args.recall_lengths, "--recall-samples", str(args.recall_samples), "--out", str(eval_dir),
            "--seed", str(args.seed), "--quiet"]
    if evaluate.main(argv) != 0:
        return []
    with open(eval_dir / "recall.csv", newline="") as f:
        return list(csv.DictReader(f))


def plot(out: Path, layers: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.sweep.collect import read_metrics

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, layer in enumerate(layers):
        lines = read_metrics(out / "runs" / layer / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in lines if r.get("loss") is not None and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]
        if not train:
            continue
        k = max(1, len(train) // 20)  # a centred-free running mean over ~5 % of the steps
        ys = [sum(y for _, y in train[max(0, j - k + 1):j + 1]) / len(train[max(0, j - k + 1):j + 1])
              for j in range(len(train))]
        (line,) = ax.plot([s for s, _ in train], ys, lw=1.2, label=layer, color=f"C{i % 10}")
        if val:
            ax.plot(*zip(*val), "o", color=line.get_color(), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (line: train, running mean; dots: validation)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    path = out / "loss_curves.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_tables(out: Path, rows: list[dict], recall_rows: list[dict]) -> None:
    keys = sorted({(r["task"], int(r["length"])) for r in recall_rows})
    acc = {(r["model"], r["task"], int(r["length"])): float(r["accuracy"]) for r in recall_rows}
    cols = COLUMNS + [f"{t}@{n}" for t, n in keys]
    for r in rows:
        r.update({f"{t}@{n}": acc.get((r["layer"], t, n), math.nan) for t, n in keys})
    for name, text in (("results.csv", None), ("results.md", None)):
        tmp = out / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            if name.endswith(".csv"):
                w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n", restval="")
                w.writeheader()
                w.writerows(rows)
            else:
                f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
                f.writelines("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |\n" for r in rows)
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", required=True, help="comma-separated layer types (memory layers, attention, swa)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", required=True, help="output folder (re-running resumes / skips finished runs)")
    p.add_argument("--model", default="tiny", help="size preset (its family defaults apply) or WIDTHxDEPTH")
    p.add_argument("--num-layers", type=int, default=2, help="blocks (0 = the preset's)")
    p.add_argument("--vocab-size", type=int, default=0, help="vocabulary (0 = the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field for every layer (repeatable; VALUE as JSON), e.g. attention_window=128; "
                        "give each setting its own --out (a model already written there is reused)")
    p.add_argument("--data", default="default")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps (-1 = 10%% of --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25, help="validation every N steps (0 = at the end only)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each training")
    p.add_argument("--recall-lengths", default="128,512", help="MQAR / passkey lengths ('' = no recall)")
    p.add_argument("--recall-samples", type=int, default=32)
    args = p.parse_args(argv)
    layers = _csv_list(args.layers)
    if not layers or args.steps < 1:
        print("error: need at least one layer type and --steps ≥ 1", file=sys.stderr)
        return 2
    from models import MemoryLMConfig
    from pretrain.sweep.plan import PlanError, model_config

    try:
        unknown = sorted(set(parse_set(args.set)) - set(MemoryLMConfig().to_dict()))
        if unknown:
            raise ValueError(f"--set: {', '.join(unknown)} is not a MemoryLMConfig field")
        for layer in layers:  # every name checked before any training starts
            model_config(args.model, layer, **model_overrides(args))
    except (PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [train_layer(args, layer, out) for layer in layers]
    trained = [r["layer"] for r in rows if not r["error"]]
    recall_rows = recall(args, out, trained) if args.recall_lengths and trained else []
    write_tables(out, rows, recall_rows)
    plot(out, layers)
    print((out / "results.md").read_text(), end="")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
