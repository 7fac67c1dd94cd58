"""plan: a grid of runs (model sizes × token budgets × memory-layer types) written as configs.

    SWEEP/sweep.json                   the manifest: settings + one entry per run (N, D, steps, paths)
    SWEEP/runs.txt                     run names, one a line; Slurm array task i runs line i+1
    SWEEP/runs/NAME/train_config.json  the training program's settings (python -m pretrain.train --config)
    SWEEP/models/LAYER-SIZE/           the model (a preset's sizes + the layer type, initialised with the
                                       seed) as an HF folder, passed as --model; shared by the budgets

A layer type is a memory layer of ``models`` (ttt_linear, ttt_mlp, deltanet, gated_deltanet, titans, lact,
…: ``memory_layer``) or an attention baseline (``attention``, ``swa``: ``layer_pattern``); preset sizes get
that family's per-size defaults (models.presets.FAMILY_DEFAULTS). A size is a preset name (``test``, ``tiny``, ``125m``, …) or ``WIDTHxDEPTH`` (e.g. ``192x3``: hidden 192,
3 blocks, head dim 64, SwiGLU width 8/3·hidden rounded up to 16; vocabulary and the rest from
``--base-model``). A token budget D becomes ``steps = ceil(D / (seq_len · micro_batch · grad_accum · DP))``
and the run's D is the tokens those steps actually see. N counts the parameters outside the embedding
(and the tied output head): the Kaplan/Chinchilla convention for small models, where embeddings
dominate the total but not the compute; ``n_params_total`` is kept too.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path


class PlanError(ValueError):
    pass


def model_config(size: str, layer: str, base_model: str = "tiny", **overrides):
    """MemoryLMConfig for a size spec and a memory-layer type."""
    from models import MEMORY_LAYERS, PRESETS, preset_config
    from models.hf.configuration_memory import ATTENTION_LAYERS

    if layer in ATTENTION_LAYERS:  # the attention baseline: every block's mixer is attention
        overrides = {"layer_pattern": layer, **overrides}
    elif layer in MEMORY_LAYERS:
        overrides = {"memory_layer": layer, **overrides}
    else:
        raise PlanError(f"layer type {layer!r} is not implemented (yet); available: "
                        f"{sorted(MEMORY_LAYERS) + sorted(ATTENTION_LAYERS)}")
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if size in PRESETS:
        return preset_config(size, **overrides)
    if not m:
        raise PlanError(f"size {size!r}: expected a preset ({', '.join(PRESETS)}) or WIDTHxDEPTH like 192x3")
    hidden, depth = int(m.group(1)), int(m.group(2))
    if hidden % 64:
        raise PlanError(f"size {size!r}: the width must be a multiple of 64 (head dim 64)")
    inter = -(-int(hidden * 8 / 3) // 16) * 16
    return preset_config(base_model, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // 64,
                         intermediate_size=inter, **overrides)


def write_model(config, folder: Path, seed: int) -> tuple[int, int]:
    """Writes the freshly initialised model (seeded) as an HF folder for ``--model``; returns
    (non-embedding parameters, all parameters).

    (pretrain.train loads an HF folder's weights; until it also accepts a folder holding only
    config.json as a new model, the sweep writes the initial weights itself.)
    """
    import torch

    from models import MemoryLMForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = MemoryLMForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return count_params(model)


def count_params(model) -> tuple[int, int]:
    """(non-embedding parameters, all parameters) of a model."""
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    return total - emb - (head.weight.numel() if untied else 0), total


def suggest_sizes(targets, layer: str, base_model: str = "tiny", vocab_size: int = 0,
                  aspect: float = 64.0) -> list[tuple[str, int]]:
    """For each target N (non-embedding parameters), the ``WIDTHxDEPTH`` size nearest to it in log N,
    shaped like the sweep (width / depth within 2× of ``aspect``, ties to the closer shape), and its N;
    duplicates dropped. N is linear in the depth for a width (two models per width, built on the meta
    device: no memory, milliseconds each); the chosen size's N is then counted exactly."""
    import torch

    from models import MemoryLMForCausalLM

    vocab = {"vocab_size": vocab_size} if vocab_size else {}

    def n_of(width: int, depth: int) -> int:
        with torch.device("meta"):
            return count_params(MemoryLMForCausalLM(model_config(f"{width}x{depth}", layer, base_model, **vocab)))[0]

    per_width = {}  # width -> (N of one more block, N of the rest)

    def n_est(width: int, depth: int) -> float:
        if width not in per_width:
            one, two = n_of(width, 1), n_of(width, 2)
            per_width[width] = (two - one, 2 * one - two)
        block, rest = per_width[width]
        return depth * block + rest

    out: list[tuple[str, int]] = []
    for target in targets:
        best, best_score = None, math.inf
        for width in range(64, 64 * 256 + 1, 64):
            depths = range(max(1, math.ceil(width / (2 * aspect))), int(2 * width / aspect) + 1)
            if not depths:
                continue
            if n_est(width, depths[0]) > 2 * target:
                break
            for depth in depths:
                n = n_est(width, depth)
                score = abs(math.log(n / target)) + 0.1 * abs(math.log(width / depth / aspect))
                if score < best_score:
                    best, best_score = (width, depth), score
        if best is not None:
            found = (f"{best[0]}x{best[1]}", n_of(*best))
            if found not in out:
                out.append(found)
    return out


def _parse_tokens(text: str) -> list[int]:
    try:
        return [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PlanError(f"--tokens {text!r}: expected numbers like 2e6,4e6") from None


def plan(sweep_dir, sizes: list[str], tokens: list[int], layers: list[str], *, data: str = "synthetic",
         seq_len: int = 128, micro_batch: int = 8, grad_accum: int = 1, nproc: int = 1, lr: float = 1e-3,
         warmup_fraction: float = 0.05, schedule: str = "cosine", eval_every: int = 0, save_every: int = 0,
         seed: int = 0, base_model: str = "tiny", vocab_size: int = 0, base_config: str | None = None, extra: dict | None = None,
         overwrite: bool = False) -> dict:
    """Writes the sweep and returns its manifest (see the module docstring).

    Everything is checked before anything is written, and the files are written to a temporary folder
    next to SWEEP that then takes SWEEP's place (or, re-planning with ``overwrite``, is moved into it,
    keeping the runs' outputs): a refused or failed plan leaves SWEEP as it was. Runs get
    ``precision: auto`` (bf16 on a GPU, fp32 on CPU: decided where each run runs) unless ``base_config``
    or ``extra`` say otherwise.
    """
    from pretrain.config import ConfigError, TrainConfig, load_config_file

    sweep = Path(sweep_dir).absolute()
    if (sweep / "sweep.json").exists() and not overwrite:
        raise PlanError(f"{sweep}/sweep.json exists (pass --overwrite to re-plan; finished runs are kept)")
    if sweep.exists() and not sweep.is_dir():
        raise PlanError(f"{sweep} exists and is not a folder")
    if not sizes or not tokens or not layers:
        raise PlanError("need at least one size, one token budget and one memory layer")
    if min(tokens) < 1:
        raise PlanError(f"token budgets must be ≥ 1, got {tokens}")
    try:
        base = load_config_file(base_config) if base_config else {}
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    tokens_per_step = seq_len * micro_batch * grad_accum * nproc
    # ---------------------------------------------------------------- check everything
    vocab = {"vocab_size": vocab_size} if vocab_size else {}
    models = {(layer, size): model_config(size, layer, base_model, **vocab) for layer in layers for size in sizes}
    runs = []
    for (layer, size) in models:
        model_dir = sweep / "models" / f"{layer}-{size}"  # one initialisation shared by the budgets
        for budget in tokens:
            steps = max(1, math.ceil(budget / tokens_per_step))
            name = f"{layer}-{size}-d{budget:.0e}".replace("+", "")
            run_dir = sweep / "runs" / name
            train = {"precision": "auto", **base, **(extra or {}),
                     "model": str(model_dir), "data": data, "out": str(run_dir), "steps": steps,
                     "seq_len": seq_len, "micro_batch": micro_batch, "grad_accum": grad_accum, "lr": lr,
                     "schedule": schedule, "warmup": max(1, int(warmup_fraction * steps)), "seed": seed,
                     "eval_every": eval_every or steps, "save_every": save_every or max(1, steps // 4)}
            try:
                TrainConfig(**train).validate()
            except (ConfigError, TypeError) as exc:
                raise PlanError(f"run {name}: {exc}") from None
            runs.append({"name": name, "size": size, "layer": layer, "tokens_budget": budget,
                         "tokens": steps * tokens_per_step, "steps": steps,
                         "dir": str(run_dir), "config": str(run_dir / "train_config.json"), "_train": train})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise PlanError("two runs got the same name: give distinct sizes and token budgets")
    # ---------------------------------------------------------------- write to a temporary folder
    sweep.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{sweep.name}.plan-", dir=sweep.parent))
    try:
        counts = {key: write_model(cfg, stage / "models" / f"{key[0]}-{key[1]}", seed) for key, cfg in models.items()}
        for r in runs:
            n, n_total = counts[(r["layer"], r["size"])]
            r.update(n_params=n, n_params_total=n_total, flops_6nd=6.0 * n * r["tokens"])
            (stage / "runs" / r["name"]).mkdir(parents=True)
            (stage / "runs" / r["name"] / "train_config.json").write_text(json.dumps(r.pop("_train"), indent=2) + "\n")
        keys = ("name", "size", "layer", "n_params", "n_params_total", "tokens_budget", "tokens", "steps", "flops_6nd",
                "dir", "config")
        runs = [{k: r[k] for k in keys} for r in runs]
        manifest = {"version": 1, "nproc": nproc, "tokens_per_step": tokens_per_step, "sizes": sizes, "tokens": tokens,
                    "layers": layers, "base_model": base_model, "vocab_size": vocab_size, "runs": runs}
        (stage / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (stage / "runs.txt").write_text("".join(n + "\n" for n in names))
        _move_into_place(stage, sweep)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _move_into_place(stage: Path, sweep: Path) -> None:
    """A new SWEEP: one rename. An existing one: every model folder and run config replaced (the runs'
    outputs stay), runs.txt, and sweep.json last."""
    try:
        stage.rename(sweep)  # fails if SWEEP exists and is not empty
        return
    except OSError:
        if not sweep.is_dir():
            raise
    for model in sorted((stage / "models").iterdir()):
        dest = sweep / "models" / model.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.rename(stage / f"old-{model.name}")
        model.rename(dest)
    for run in sorted((stage / "runs").iterdir()):
        (sweep / "runs" / run.name).mkdir(parents=True, exist_ok=True)
        os.replace(run / "train_config.json", sweep / "runs" / run.name / "train_config.json")
    os.replace(stage / "runs.txt", sweep / "runs.txt")
    os.replace(stage / "sweep.json", sweep / "sweep.json")


def load_manifest(sweep_dir) -> dict:
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise PlanError(f"{path} does not exist: run `python -m pretrain.sweep plan` first")
    return json.loads(path.read_text())
