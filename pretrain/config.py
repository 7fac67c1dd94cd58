"""The training configuration: one dataclass, loaded from a file in ``configs/`` plus CLI overrides.

Precedence (later wins): the dataclass defaults < ``--config FILE`` (YAML or JSON, keys are the
field names) < command-line flags. Every field is a flag: ``seq_len`` ↔ ``--seq-len``; booleans
also take ``--no-<name>``. ``python -m pretrain.train --help`` lists them all.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A setting (or a combination of settings) that cannot work; printed as one ``error:`` line."""


# Settings a resumed run may change freely (nothing the run has done depends on them). Every other
# setting changes the trajectory: a re-run into the same RUN_DIR that changes one is refused unless
# ``--allow-change`` names it. The one list of both kinds (extend it here, nowhere else).
HARMLESS_KEYS = frozenset({
    "out", "steps", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "tensorboard",
    "peak_tflops", "max_bad_steps", "spike_k", "spike_window", "skip_spikes", "allow_change",
    # the layout: an elastic resume (pretrain.elastic) re-shards onto another TP × CP × DP or ZeRO stage and
    # keeps the global batch (the trajectory key) by re-deriving micro-batch × accumulation
    "tp", "cp", "cp_heads", "cp_interleave", "zero_stage", "offload", "deepspeed_config", "micro_batch", "grad_accum", "activation_checkpointing",
})


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ what to train, on what
    model: str = _f("tiny", "model preset (test, tiny, 125m, 350m, 760m, 1b) or a Hugging Face folder of this project's model")
    data: str = _f("synthetic", "prepared data folder (data_pipeline.prepare), 'default' (embedded corpus) or 'synthetic'")
    out: str = _f("runs/default", "run directory: metrics.jsonl, tensorboard/, checkpoints/ (re-running resumes from it)")
    # ------------------------------------------------------------------ sizes
    steps: int = _f(1000, "optimizer steps to train for (in total, counting steps before a resume)")
    seq_len: int = _f(512, "tokens per sequence")
    micro_batch: int = _f(8, "sequences per micro-batch per data-parallel rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step (global batch = micro_batch × grad_accum × DP)")
    global_batch_size: int = _f(0, "sequences per optimizer step over all DP ranks (Megatron's); grad_accum is derived "
                                "as global / (micro_batch × DP) and the value stays fixed when a resume changes the "
                                "number of ranks (0 = micro_batch × grad_accum × DP, recorded at the first start)")
    # ------------------------------------------------------------------ parallelism
    tp: int = _f(1, "tensor-parallel size (must divide the number of heads)")
    cp: int = _f(1, "context-parallel size (must divide seq_len); DP = world / (TP × CP)")
    cp_heads: int = _f(1, "two-dimensional CP: P_h ranks of each CP group exchange head shards (all-to-all) while the "
                       "cp / P_h sequence ranks pass their heads' state (must divide --cp and the heads per TP rank; "
                       "1 = the plain state pass; docs/parallelism.md)")
    cp_interleave: bool = _f(False, "CP with --grad-accum M > 1: run the M micro-batches' forwards back to back, then "
                             "their backwards, so the wavefront fills once per step (holds M micro-batches' activations)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage (0 = replicated optimizer, DDP-equivalent)", [0, 1, 2, 3])
    offload: bool = _f(False, "offload optimizer states (and ZeRO-3 parameters) to CPU memory")
    deepspeed_config: str = _f("", "DeepSpeed JSON to use instead of configs/deepspeed/zero<stage>[_offload].json "
                               "(also --deepspeed_config; its zero_optimization.stage sets --zero-stage)")
    # ------------------------------------------------------------------ numerics
    precision: str = _f("bf16", "fp32; bf16 autocast; fp8 (Transformer Engine / torchao) for dense projections; or "
                        "auto: what the hardware runs well (bf16 on a GPU with bf16, else fp32)",
                        ["fp32", "bf16", "fp8", "auto"])
    fp8_backend: str = _f("te", "FP8 implementation: te (Transformer Engine) or torchao", ["te", "torchao"])
    fp8_recipe: str = _f("delayed", "FP8 scaling recipe: delayed or current (tensor-wise) scaling", ["delayed", "current"])
    activation_checkpointing: bool = _f(False, "recompute each block in backward instead of storing its activations")
    scan_checkpoint_group: int = _f(-1, "scan checkpointing: the layer's chunks (TTT: mini-batches) per recomputed piece of the memory-layer scan (-1 = model's value, 0 = off)")
    tnt_local_chunk_sizes: str = _f("", "TNT two-stage training, stage 2: the local memories' chunk sizes (comma-separated, "
                                    "one per local memory) replacing the model's, e.g. 8,16 ('' = the model's value)")
    # ------------------------------------------------------------------ memory state
    reset: str = _f("boundary", "when the memory layers restart from their initial state: 'boundary' (at every document "
                    "start; rows independent), 'never' (the state is carried across steps, truncated backprop; the data "
                    "comes as contiguous streams per row) or 'every:N' (every N tokens of a row)")
    # ------------------------------------------------------------------ optimizer and schedule
    lr: float = _f(3e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", ["cosine", "wsd"])
    warmup: int = _f(100, "linear warmup steps")
    decay_fraction: float = _f(0.2, "WSD: fraction of the steps spent in the final (linear) decay")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices of projections/MLPs only; see docs/training.md)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed of the model initialisation, the data order and every RNG")
    # ------------------------------------------------------------------ logging, evaluation, checkpoints
    log_every: int = _f(10, "console line every N steps (metrics.jsonl gets every step)")
    eval_every: int = _f(0, "validation loss every N steps (0 = off)")
    eval_batches: int = _f(4, "micro-batches per validation")
    save_every: int = _f(500, "checkpoint every N steps (also at the end and on SIGTERM/SIGUSR1)")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep (0 = all)")
    tensorboard: bool = _f(True, "write tensorboard events to RUN_DIR/tensorboard")
    peak_tflops: float = _f(0.0, "peak FLOP/s per device for MFU, in TFLOP/s (0 = GPU table or measured CPU GEMM)")
    # ------------------------------------------------------------------ divergence guard and resume
    max_bad_steps: int = _f(5, "consecutive non-finite steps (loss or gradient norm; each one is skipped) after which "
                            "the run stops with an error, saving nothing")
    spike_k: float = _f(6.0, "a loss above the running mean of the last --spike-window losses by this many standard "
                        "deviations is a loss spike (a warning; see --skip-spikes)")
    spike_window: int = _f(50, "losses in the running mean and standard deviation of the spike detector")
    skip_spikes: bool = _f(False, "skip the optimizer update of a loss-spike step (as of a non-finite one)")
    allow_change: str = _f("", "resuming: settings that may differ from those the run was started with, "
                           "comma-separated (e.g. lr,seq_len); recorded in RUN_DIR/config_history.jsonl")

    # ------------------------------------------------------------------ helpers
    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def validate(self) -> None:
        """Checks that need no model, data or processes (those come in train.py)."""
        positive = ("steps", "seq_len", "micro_batch", "grad_accum", "tp", "cp", "cp_heads", "save_every", "log_every",
                    "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("max_bad_steps", "spike_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "keep_checkpoints", "weight_decay", "grad_clip", "peak_tflops",
                     "global_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {getattr(self, f.name)!r}")
        for name in ("lr", "eps", "spike_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        unknown = [k for k in self.allowed_changes() if k not in {f.name for f in fields(self)}]
        if unknown:
            raise ConfigError(f"--allow-change names unknown settings: {', '.join(unknown)}")
        if self.global_batch_size and self.grad_accum != 1:
            raise ConfigError("give --global-batch-size or --grad-accum, not both (the accumulation is derived from "
                              "the global batch)")
        if self.global_batch_size and self.global_batch_size % self.micro_batch:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch "
                              f"{self.micro_batch}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.cp % self.cp_heads:
            raise ConfigError(f"--cp-heads {self.cp_heads} does not divide --cp {self.cp} (CP = heads × sequence ranks)")
        if self.cp_interleave and self.cp == 1:
            raise ConfigError("--cp-interleave interleaves the micro-batches of the CP wavefront: it needs --cp > 1")
        if self.cp_interleave and self.zero_stage == 3:
            raise ConfigError("--cp-interleave with ZeRO-3 is not exact (measured: the loss after the first update "
                              "differs from the plain loop's by 2e-3; ZeRO-3 with CP alone is exact): use --zero-stage "
                              "1 or 2, or drop --cp-interleave")
        if self.seq_len % self.cp:
            raise ConfigError(f"--cp {self.cp} does not fit the sequence: --seq-len {self.seq_len} is not divisible by it")
        kind, every = reset_policy(self.reset)
        if kind == "never" and self.cp > 1:
            raise ConfigError("--reset never carries the memory state from step to step, which context parallelism "
                              "does not support (each rank starts from its neighbour's state): use --cp 1")
        if kind == "every" and every > self.seq_len:
            raise ConfigError(f"--reset every:{every} is longer than --seq-len {self.seq_len}: use 'boundary' or a "
                              "shorter period")
        if self.deepspeed_config:
            deepspeed_settings(self.deepspeed_config, self.to_dict())  # readable, and agrees with the flags

    def to_dict(self) -> dict:
        return asdict(self)

    def allowed_changes(self) -> list[str]:
        return [k.strip().replace("-", "_") for k in self.allow_change.split(",") if k.strip()]


def settings_changes(started: dict, cfg: TrainConfig) -> dict:
    """{key: (old, new)} of every setting ``cfg`` changes relative to ``started`` (a saved ``to_dict``;
    keys it lacks, from an older version, count as their defaults)."""
    now = cfg.to_dict()
    defaults = TrainConfig().to_dict()
    return {k: (started.get(k, defaults[k]), v) for k, v in now.items() if started.get(k, defaults[k]) != v}


def check_resume_settings(started: dict, cfg: TrainConfig) -> dict:
    """The changes a resume makes; a ConfigError listing those that alter the trajectory and that
    ``--allow-change`` does not name."""
    changes = settings_changes(started, cfg)
    allowed = set(cfg.allowed_changes()) | HARMLESS_KEYS
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"{cfg.out} was trained with other settings ({listed}): re-run with the run's settings, "
                          f"or pass --allow-change {','.join(refused)} to change them from here on")
    return changes


def reset_policy(value: str) -> tuple[str, int | None]:
    """``boundary`` | ``never`` | ``every:N`` → (kind, N or None); anything else is a ConfigError."""
    text = str(value).strip().lower()
    if text in ("boundary", "never"):
        return text, None
    if text.startswith("every:"):
        n = text[len("every:"):]
        if n.isdigit() and int(n) >= 1:
            return "every", int(n)
    raise ConfigError(f"--reset must be 'boundary', 'never' or 'every:N' with N ≥ 1 tokens, got {value!r}")


# --------------------------------------------------------------------------- loading


def _convert(f, value):
    """A value from a config file, checked against the field's type."""
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {f.name!r} must be true or false, got {value!r}")
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"config key {f.name!r} must be {typ.__name__}, got {value!r}")


def load_config_file(path: str | Path) -> dict:
    """A YAML/JSON mapping of field names → values (a name given relative to configs/ also works)."""
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / p).is_file():
        p = CONFIG_DIR / p
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"cannot parse config file {p}: {exc}".splitlines()[0]) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {p}: unknown setting {key!r}")
        out[name] = _convert(known[name], value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pretrain a memory-layer language model (DeepSpeed ZeRO, TP × CP × DP, bf16/fp8). "
        "Re-running the same command resumes from RUN_DIR/checkpoints/latest.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings (see configs/runs/); flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=None, help=f.metadata["help"] + f" (default: {f.default!r})")
        typ = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else f.name.upper()
            parser.add_argument(flag, type=typ, choices=choices, metavar=metavar, **kw)
    # the DeepSpeed launcher's idiom: `--deepspeed --deepspeed_config ds.json`
    parser.add_argument("--deepspeed_config", dest="deepspeed_config", metavar="DEEPSPEED_CONFIG", default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's launcher idiom "
                        "(`--deepspeed --deepspeed_config ds.json`); DeepSpeed is always used")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < --config FILE < flags; validated."""
    args = build_parser().parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    if values.get("deepspeed_config"):
        values.update(deepspeed_settings(values["deepspeed_config"], values))
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _positive_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


def _zero_stage(value) -> int:
    if isinstance(value, bool) or value not in (0, 1, 2, 3):
        raise ValueError(value)
    return int(value)


# the flags a DeepSpeed JSON may also set: flag name → (JSON path, JSON value → flag value)
_DS_KEYS = {
    "zero_stage": (("zero_optimization", "stage"), _zero_stage),
    "offload": (("zero_optimization", "offload_optimizer", "device"), lambda d: d in ("cpu", "nvme")),
    "micro_batch": (("train_micro_batch_size_per_gpu",), _positive_int),
    "global_batch_size": (("train_batch_size",), _positive_int),  # the accumulation is then derived
    "grad_accum": (("gradient_accumulation_steps",), _positive_int),
    "grad_clip": (("gradient_clipping",), float),
}


def read_deepspeed_json(path: str | Path) -> dict:
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--deepspeed-config {path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed-config {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def deepspeed_settings(path: str | Path, given: dict) -> dict:
    """What a DeepSpeed JSON decides, as TrainConfig fields — the one source of truth when
    ``--deepspeed-config`` (or the launcher's ``--deepspeed_config``) is given, so the run, its banner,
    config.json and trainer_state.json all tell the same: the ZeRO stage (0 without
    ``zero_optimization``, as in DeepSpeed), offload, the batch sizes it names (``train_batch_size``
    is the global batch; the accumulation is then derived from it) and clipping. A flag given with
    another value than the JSON's, or a JSON enabling fp16/bf16 (precision is --precision), is a
    ConfigError."""
    ds = read_deepspeed_json(path)
    out, source = {}, {}
    if "zero_optimization" not in ds:
        out["zero_stage"], source["zero_stage"] = 0, "no zero_optimization, so stage"
    for flag, (keys, convert) in _DS_KEYS.items():
        if flag == "grad_accum" and "train_batch_size" in ds:
            continue
        node = ds
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None or node == "auto":
            continue
        try:
            out[flag], source[flag] = convert(node), ".".join(keys)
        except (TypeError, ValueError):
            expected = {"zero_stage": "0, 1, 2 or 3", "offload": "a device name", "grad_clip": "a number"}
            raise ConfigError(f"--deepspeed-config {path}: {'.'.join(keys)} = {node!r} is not valid: it must be "
                              f"{expected.get(flag, 'a positive integer')}") from None
    for flag, value in out.items():
        if flag in given and given[flag] != value:
            raise ConfigError(f"--deepspeed-config {path} sets {source[flag]} = {value!r} but "
                              f"--{flag.replace('_', '-')} is {given[flag]!r}: give one of them, or the same value")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") not in (False, "auto", None):
            raise ConfigError(f"--deepspeed-config {path} enables {key}: the precision is set by --precision "
                              "(parameters stay float32, bf16/fp8 are autocast)")
    return out
