"""Long-context evaluation of one or more Hugging Face folders: loss by token position and recall.

    python -m pretrain.evaluate MODEL_DIR [MODEL_DIR ...] [--compare DIR] --data DATA \\
        --lengths 1024,4096,16384 [--tasks ppl,mqar,passkey] [--out DIR]
    python -m pretrain.evaluate MEM_DIR --compare ATTN_DIR --data default --lengths 512,2048 --chunk-tokens 1024
    torchrun --nproc-per-node 4 -m pretrain.evaluate MEM_DIR --data data/books --lengths 65536 --cp 4

MODEL_DIR is a folder of this project (``pretrain.export``, a converted official checkpoint,
``save_pretrained`` of ``MemoryLMForCausalLM``) or any ``AutoModelForCausalLM`` folder (e.g. a
Llama saved with ``save_pretrained``): every model gets the same windows and tasks, and all of
them land on the same CSVs and plots.

* ``ppl``: next-token loss on held-out windows of each length, summed per position bucket
  (``--buckets log``: [0,16), [16,32), …; or a fixed width) → ``ppl_by_position.csv`` (model,
  length, bucket_start, bucket_end, tokens, loss, ppl), ``ppl.csv`` (whole windows) and
  ``ppl_by_position.png``. DATA: a prepared folder, ``default``, ``synthetic`` or a text/jsonl file.
* ``mqar`` / ``passkey``: synthetic recall generated in code (seeded), scored teacher-forced: the
  true sequence is fed once and the model's greedy (argmax over its whole vocabulary) next-token
  prediction at each answer position is compared with the answer → ``recall.csv`` (accuracy per
  answer token, exact = all answers of a sample right, chance) and ``recall.png``.

``--chunk-tokens N`` runs each window in pieces of N tokens with the state carried
(``memory_state``; the KV cache for other models), so a memory model's length is not bounded by
activation memory. ``--cp P`` under ``torchrun`` splits every window over P ranks with
``parallel.parallelize`` (the state passed rank to rank, as in training); world ÷ P ranks share
the windows (data parallel). Only models of this project run under CP. Files are written under a
temporary name and renamed; bad input is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.eval_tasks import (ALIGNS, RECALL_TASKS, EvalError, RecallConfig, bucket_edges, open_stream,
                                 recall_batch)

TASKS = ("ppl",) + RECALL_TASKS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCORE_BLOCK = 4096  # positions whose log-softmax is taken at once
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ models
@dataclass
class ModelEntry:
    """One MODEL_DIR: its display name, its config and whether this project built it."""

    path: Path
    name: str
    config: object
    own: bool
    tokenizer: object = None
    special_ids: list = field(default_factory=list)


def inspect_folder(path: str, name: str, trust_remote_code: bool = False) -> ModelEntry:
    """Reads the folder's config (not the weights): errors here come before any process group."""
    import models  # noqa: F401  (registers memory_lm with the Auto classes)
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise EvalError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder} has no config.json (expected a Hugging Face folder, e.g. from pretrain.export)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise EvalError(f"cannot read the configuration of {folder}: {str(exc).splitlines()[0]}") from None
    entry = ModelEntry(folder, name, config, own=config.model_type == "memory_lm")
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            entry.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise EvalError(f"cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}") from None
        entry.special_ids = sorted(set(entry.tokenizer.all_special_ids))
    return entry


def load_model(entry: ModelEntry, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """The model in eval mode on ``device``; this project's own class for ``memory_lm`` folders."""
    from transformers import AutoModelForCausalLM

    from models import MemoryLMForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours (tqdm per task and length) is enough
    try:
        if entry.own:  # never the folder's copy of the code: parallel/ patches this project's classes
            model = MemoryLMForCausalLM.from_pretrained(entry.path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot load the model in {entry.path}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def task_ids(entry: ModelEntry, task_vocab: int | None, offset: str) -> RecallConfig:
    """Where the synthetic tasks' ids go in this model's vocabulary.

    ``offset="auto"``: the first id from which ``task_vocab`` consecutive ids hold no special
    token of the folder's tokenizer (0 without a tokenizer: the ids are the data, as for a model
    trained on ``--data synthetic|mqar|passkey``). ``task_vocab=None``: 256, or what fits.
    """
    vocab = entry.config.vocab_size
    size = task_vocab if task_vocab is not None else min(256, vocab)
    if offset == "auto":
        start = 0
        for s in entry.special_ids:
            if start <= s < start + size:
                start = s + 1
        if task_vocab is None:
            size = min(size, vocab - start)
    else:
        try:
            start = int(offset)
        except ValueError:
            raise EvalError(f"--task-offset must be 'auto' or an integer, got {offset!r}") from None
        if start < 0:
            raise EvalError(f"--task-offset must be ≥ 0, got {start}")
    if size < 16 or start + size > vocab:
        raise EvalError(f"{entry.name}: task ids [{start}, {start + size}) do not fit its vocabulary of {vocab} "
                        "(set --task-vocab / --task-offset)")
    return RecallConfig(task_vocab=size, offset=start)


# ------------------------------------------------------------------------------------ scoring
class Scorer:
    """Teacher-forced next-token scores of one model: the loss and the greedy hit at each position.

    Single process: the window in one call, or in ``chunk_tokens`` pieces with the state carried.
    Under CP (``dims.cp > 1``, a parallelized model of this project): this rank's contiguous piece.
    """

    def __init__(self, model, own: bool, device, dims, chunk_tokens: int | None = None):
        self.model, self.own, self.device, self.dims, self.chunk = model, own, device, dims, chunk_tokens
        # the KV cache's argument (and output field): `cache` in recent transformers, `past_key_values` before
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, piece: torch.Tensor, state, docs: dict):
        carry = self.chunk is not None
        if self.dims.cp > 1:
            return self.model(piece, use_cache=False, **docs).logits, None
        if self.own:
            out = self.model(piece, memory_state=state, use_cache=carry, **docs)
            return out.logits, out.memory_state
        out = self.model(input_ids=piece, use_cache=carry, **{self._cache_arg: state})
        return out.logits, (out.get(self._cache_arg) if carry else None)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """(first position of this rank's piece, nll [B, t] float64, hit [B, t] bool, counted [B, t] bool).

        ``doc_ids`` [B, T] (numbered over the whole window, as the loader does): this project's
        models restart their memory where it changes (others ignore it). Pieces of a chunked
        window get ``doc_starts`` instead, so a document that starts at a piece's first token
        drops the carried state there too.
        """
        from parallel.loss import cp_slice, token_losses

        start = 0
        if self.dims.cp > 1:
            start = self.dims.cp_rank * (ids.shape[1] // self.dims.cp)
            ids, targets = cp_slice(ids, self.dims), cp_slice(targets, self.dims)
            doc_ids = cp_slice(doc_ids, self.dims) if doc_ids is not None else None
        if not self.own:
            doc_ids = None
        starts = None
        if doc_ids is not None and self.chunk is not None:
            starts = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=False)
        step = self.chunk or ids.shape[1]
        state, nll, hit = None, [], []
        for s in range(0, ids.shape[1], step):
            docs = {} if doc_ids is None else \
                {"doc_starts": starts[:, s:s + step].to(self.device)} if starts is not None else \
                {"doc_ids": doc_ids.to(self.device)}
            logits, state = self._forward(ids[:, s:s + step].to(self.device), state, docs)
            tgt = targets[:, s:s + step].to(self.device)
            for b in range(0, tgt.shape[1], SCORE_BLOCK):  # float32 log-softmax of a block at a time
                lg, t = logits[:, b:b + SCORE_BLOCK].float(), tgt[:, b:b + SCORE_BLOCK]
                nll.append(token_losses(lg, t, self.dims).double().cpu())
                hit.append((lg.argmax(-1) == t).cpu())
            del logits
        counted = targets != -100
        return start, torch.cat(nll, 1) * counted, torch.cat(hit, 1) & counted, counted


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over every process (each holds other windows or other positions); no-op single-process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    dev = t.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    out = t.to(dev)
    dist.all_reduce(out)
    return out.cpu()


def _my_batches(n: int, batch_size: int, dims) -> list[list[int]]:
    """This DP rank's sample indices (i ≡ dp_rank mod dp), in batches."""
    mine = list(range(dims.dp_rank, n, dims.dp))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def window_doc_ids(ids: torch.Tensor, reset: tuple, eos_id: int | None) -> torch.Tensor | None:
    """The ``doc_ids`` a window gets under ``--reset`` (as training's ``reset_inputs``): ``boundary``
    → a new document after each EOS (``data_pipeline.sequences.document_ids``); ``every:N`` → every
    N tokens; ``never`` → None."""
    kind, every = reset
    if kind == "never":
        return None
    if kind == "every":
        return (torch.arange(ids.shape[1]) // every).expand(ids.shape[0], -1)
    if eos_id is None:
        return torch.zeros_like(ids)
    is_eos = (ids == eos_id).long()
    return F.pad(is_eos[:, :-1].cumsum(1), (1, 0))


def position_losses(scorer: Scorer, windows: np.ndarray, edges: list[int], batch_size: int, dims, bar=None,
                    reset: tuple = ("never", None), eos_id: int | None = None):
    """[(bucket_start, bucket_end, tokens, loss_sum)] over all windows (summed over all ranks)."""
    sums = torch.zeros(len(edges) - 1, 2, dtype=torch.float64)
    inner = torch.tensor(edges[1:-1])
    for idx in _my_batches(len(windows), batch_size, dims):
        w = torch.from_numpy(windows[idx])
        start, nll, _, counted = scorer(w[:, :-1], w[:, 1:], window_doc_ids(w[:, :-1], reset, eos_id))
        bucket = torch.bucketize(start + torch.arange(nll.shape[1]), inner, right=True)
        sums[:, 0].index_add_(0, bucket, nll.sum(0))
        sums[:, 1].index_add_(0, bucket, counted.sum(0).double())
        if bar is not None:
            bar.update(1)
    sums = _all_reduce(sums)
    return [(edges[i], edges[i + 1], int(sums[i, 1]), float(sums[i, 0])) for i in range(len(edges) - 1)]


def recall_scores(scorer: Scorer, ids: np.ndarray, targets: np.ndarray, batch_size: int, dims, bar=None,
                  reset: tuple = ("never", None)) -> dict:
    """Answers, correct answers and exactly-solved samples over all samples (summed over all ranks)."""
    per_sample = torch.zeros(len(ids), 2, dtype=torch.float64)  # correct, answers
    for idx in _my_batches(len(ids), batch_size, dims):
        x = torch.from_numpy(ids[idx])  # one sequence, no EOS: only every:N resets inside it
        _, _, hit, counted = scorer(x, torch.from_numpy(targets[idx]), window_doc_ids(x, reset, None))
        per_sample[idx, 0] += hit.sum(1).double()
        per_sample[idx, 1] += counted.sum(1).double()
        if bar is not None:
            bar.update(1)
    per_sample = _all_reduce(per_sample)
    correct, answers = per_sample[:, 0], per_sample[:, 1]
    return {"samples": len(ids), "answers": int(answers.sum()), "correct": int(correct.sum()),
            "exact": int(((correct == answers) & (answers > 0)).sum())}


# ------------------------------------------------------------------------------------ outputs
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in columns} for r in rows)
    _atomic_write(path, buf.getvalue().encode())


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _atomic_write(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLES = ("-", "--", ":", "-.")


def plot_ppl(rows: list[dict], path: Path) -> None:
    """Loss against token position (bucket middle, log axis): a colour per model, a line style per length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    for m, name in enumerate(names):
        for j, length in enumerate(lengths):
            pts = [r for r in rows if r["model"] == name and r["length"] == length and r["tokens"]]
            if pts:
                ax.plot([(r["bucket_start"] + r["bucket_end"] - 1) / 2 + 1 for r in pts], [r["loss"] for r in pts],
                        STYLES[j % len(STYLES)], marker="o", ms=3, color=f"C{m % 10}", label=f"{name} @ {length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket middle, 1-based)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(names)))
    _save_png(fig, path)
    plt.close(fig)


def plot_recall(rows: list[dict], path: Path) -> None:
    """Accuracy against length, one panel per task, a line per model (and passkey depth); chance dotted."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    names = list(dict.fromkeys(r["model"] for r in rows))
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        depths = list(dict.fromkeys(r["depth"] for r in mine))
        for m, name in enumerate(names):
            for j, depth in enumerate(depths):
                pts = sorted((r for r in mine if r["model"] == name and r["depth"] == depth), key=lambda r: r["length"])
                label = name if len(depths) == 1 else f"{name} (depth {depth})"
                ax.plot([r["length"] for r in pts], [r["accuracy"] for r in pts], STYLES[j % len(STYLES)], marker="o",
                        color=f"C{m % 10}", label=label)
        for chance in sorted({r["chance"] for r in mine}):
            ax.axhline(chance, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("answer accuracy (greedy, teacher-forced)")
        ax.set_title(f"{task} (dotted: chance)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


PPL_COLUMNS = ["model", "length", "bucket_start", "bucket_end", "tokens", "loss", "ppl"]
PPL_SUMMARY_COLUMNS = ["model", "length", "windows", "tokens", "loss", "ppl"]
RECALL_COLUMNS = ["model", "task", "length", "depth", "samples", "answers", "accuracy", "exact", "chance",
                  "task_vocab", "task_offset"]


def write_outputs(out: Path, results: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if results["ppl_by_position"]:
        write_csv(out / "ppl_by_position.csv", PPL_COLUMNS, results["ppl_by_position"])
        write_csv(out / "ppl.csv", PPL_SUMMARY_COLUMNS, results["ppl"])
        plot_ppl(results["ppl_by_position"], out / "ppl_by_position.png")
        written += [out / "ppl_by_position.csv", out / "ppl.csv", out / "ppl_by_position.png"]
    if results["recall"]:
        write_csv(out / "recall.csv", RECALL_COLUMNS, results["recall"])
        plot_recall(results["recall"], out / "recall.png")
        written += [out / "recall.csv", out / "recall.png"]
    _atomic_write(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    return written + [out / "results.json"]


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")


# ---------------------------------------------------------------------------------- the program
def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or any(n < 1 for n in lengths):
        raise EvalError(f"--lengths must be positive, got {text!r}")
    return sorted(set(lengths))


def parse_list(text: str, allowed, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        raise EvalError(f"{flag}: unknown {bad or text!r} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def parse_depths(text: str) -> list[float | None]:
    if text == "random":
        return [None]
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--passkey-depths must be 'random' or fractions in [0, 1], got {text!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalError(f"--passkey-depths must be 'random' or fractions in [0, 1], got {text!r}")
    return depths


def _names(paths: list[str], given: str | None) -> list[str]:
    if given:
        names = [x.strip() for x in given.split(",")]
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise EvalError(f"--names needs {len(paths)} distinct names (one per model), got {given!r}")
        return names
    names = []
    for p in paths:
        base = Path(p).resolve().name or str(p)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _setup_parallel(cp: int):
    """(dims, device): process groups under torchrun (CP × DP), else single-process dims."""
    from parallel.groups import ParallelDims

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cp > 1 and "RANK" not in os.environ:
        raise EvalError(f"--cp {cp} splits each window over {cp} processes: launch with "
                        f"torchrun --nproc-per-node {cp} -m pretrain.evaluate ...")
    if world % cp:
        raise EvalError(f"{world} processes cannot be split into --cp {cp} groups")
    if world == 1:
        return ParallelDims(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from parallel import init_parallel

    dims = init_parallel(1, cp)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dims, device


@dataclass
class Plan:
    """Everything checked and generated before any process group or weights: models, windows, samples."""

    entries: list
    lengths: list
    tasks: list
    reset: tuple
    depths: list
    recall: dict = field(default_factory=dict)    # model name -> RecallConfig
    stream_of: dict = field(default_factory=dict)  # model name -> key of its token stream
    streams: dict = field(default_factory=dict)    # key -> token stream
    windows: dict = field(default_factory=dict)    # (stream key, length) -> [n, length + 1]
    samples: dict = field(default_factory=dict)    # (RecallConfig, task, length, depth) -> (ids, targets)


def plan(args) -> Plan:
    """Checks every argument and reads all data; every ``EvalError`` of a run comes from here."""
    paths = list(args.models) + list(args.compare or [])
    names = _names(paths, args.names)
    lengths = parse_lengths(args.lengths)
    tasks = parse_list(args.tasks, TASKS, "--tasks")
    depths = parse_depths(args.passkey_depths)
    if args.cp < 1:
        raise EvalError(f"--cp must be ≥ 1, got {args.cp}")
    bad = [n for n in lengths if n % args.cp]
    if bad:
        raise EvalError(f"length(s) {', '.join(map(str, bad))} not divisible by --cp {args.cp}")
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        raise EvalError(f"--chunk-tokens must be positive, got {args.chunk_tokens}")
    if args.chunk_tokens is not None and args.cp > 1:
        raise EvalError("--chunk-tokens and --cp > 1 cannot be combined (under CP each rank runs its piece in one "
                        "call)")
    for flag in ("samples", "recall_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out} exists and is not a folder")
    if "ppl" in tasks and not args.data:
        raise EvalError("--tasks ppl needs --data (a prepared folder, default, synthetic or a text/jsonl file); "
                        "or pass --tasks mqar,passkey")
    bucket_edges(max(lengths), args.buckets)  # checks the spec
    from pretrain.config import ConfigError, reset_policy

    try:
        reset = reset_policy(args.reset)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvalError("the plots need matplotlib: pip install 'memtrain[eval]' (or matplotlib)") from None
    entries = [inspect_folder(p, n, args.trust_remote_code) for p, n in zip(paths, names)]
    if args.cp > 1:
        foreign = [e.name for e in entries if not e.own]
        if foreign:
            raise EvalError(f"--cp {args.cp}: context parallelism works only for models of this project "
                            f"(model_type memory_lm); {', '.join(foreign)} is not one: evaluate it with --cp 1 "
                            "(and --chunk-tokens for long windows)")
    out = Plan(entries, lengths, tasks, reset, depths)
    for e in entries:
        ids = task_ids(e, args.task_vocab, args.task_offset)
        out.recall[e.name] = RecallConfig(**{**asdict(ids), "mqar_pairs": args.mqar_pairs,
                                             "passkey_digits": args.passkey_digits, "seed": args.seed})
        if "ppl" in tasks:
            key = _stream_key(args.data, e, out.recall[e.name])
            if key not in out.streams:
                out.streams[key] = open_stream(args.data, args.split, synthetic=out.recall[e.name],
                                               tokenizer=e.tokenizer, text_field=args.text_field)
            out.stream_of[e.name], stream = key, out.streams[key]
            if stream.vocab_size > e.config.vocab_size:
                raise EvalError(f"the data's ids reach {stream.vocab_size - 1}, beyond the vocabulary of "
                                f"{e.name} ({e.config.vocab_size})")
            _check_tokenizer(e, stream)
    for key, stream in out.streams.items():
        for length in lengths:
            out.windows[key, length] = stream.windows(length, args.samples, args.align)
    for rcfg in dict.fromkeys(out.recall.values()):
        for task in (t for t in tasks if t in RECALL_TASKS):
            for length in lengths:
                for depth in (depths if task == "passkey" else [None]):
                    out.samples[rcfg, task, length, depth] = recall_batch(task, length, args.recall_samples, rcfg,
                                                                          depth)
    return out


def evaluate_model(entry: ModelEntry, p: Plan, args, dims, device, results: dict) -> None:
    """Loads one model and appends its rows to ``results``."""
    from tqdm import tqdm

    show = dims.rank == 0 and not args.quiet

    def bar(n, desc):
        return tqdm(total=len(_my_batches(n, args.batch_size, dims)), desc=desc, disable=not show, leave=False,
                    file=sys.stderr)

    if show:
        info(f"loading {entry.name} from {entry.path}")
    model = load_model(entry, DTYPES[args.dtype], device, args.trust_remote_code)
    if dims.cp > 1:
        from parallel import parallelize

        parallelize(model, dims, cp_mode="pass")
    scorer = Scorer(model, entry.own, device, dims, args.chunk_tokens)
    if "ppl" in p.tasks:
        stream = p.stream_of[entry.name]
        for length in p.lengths:
            windows = p.windows[stream, length]
            with bar(len(windows), f"{entry.name} ppl L={length}") as b:
                buckets = position_losses(scorer, windows, bucket_edges(length, args.buckets), args.batch_size,
                                          dims, b, p.reset, p.streams[stream].eos_id)
            for lo, hi, tokens, loss_sum in buckets:
                loss = loss_sum / tokens if tokens else float("nan")
                results["ppl_by_position"].append({"model": entry.name, "length": length, "bucket_start": lo,
                                                   "bucket_end": hi, "tokens": tokens, "loss": loss, "ppl": _ppl(loss)})
            tokens = sum(b[2] for b in buckets)
            loss = sum(b[3] for b in buckets) / tokens
            results["ppl"].append({"model": entry.name, "length": length, "windows": len(windows), "tokens": tokens,
                                   "loss": loss, "ppl": _ppl(loss)})
            if show:
                info(f"{entry.name}  ppl      L={length:<7} loss {loss:.4f}  ppl {_ppl(loss):.3f}  "
                     f"({tokens:,} tokens, {len(windows)} windows)")
    rcfg = p.recall[entry.name]
    for (cfg, task, length, depth), (ids, targets) in p.samples.items():
        if cfg != rcfg:
            continue
        with bar(len(ids), f"{entry.name} {task} L={length}") as b:
            s = recall_scores(scorer, ids, targets, args.batch_size, dims, b, p.reset)
        row = {"model": entry.name, "task": task, "length": length, "depth": "random" if depth is None else depth,
               "samples": s["samples"], "answers": s["answers"], "accuracy": s["correct"] / s["answers"],
               "exact": s["exact"] / s["samples"], "chance": rcfg.chance(task), "task_vocab": rcfg.task_vocab,
               "task_offset": rcfg.offset}
        results["recall"].append(row)
        if show:
            info(f"{entry.name}  {task:<8} L={length:<7} accuracy {row['accuracy']:.3f}  exact {row['exact']:.3f}  "
                 f"(chance {row['chance']:.3f}, depth {row['depth']})")
    if dims.cp > 1:
        from parallel.context import flush_pending

        flush_pending()  # the last sends of this model before it is dropped
    del scorer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate(args) -> dict:
    """Every model on every task and length; returns the rows of the CSVs (on every rank)."""
    p = plan(args)
    dims, device = _setup_parallel(args.cp)
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "models": {e.name: str(e.path) for e in p.entries}, "ppl_by_position": [], "ppl": [], "recall": []}
    for entry in p.entries:
        evaluate_model(entry, p, args, dims, device, results)
    return results


def _stream_key(data: str, entry: ModelEntry, rcfg: RecallConfig) -> tuple:
    """Models share a token stream unless it depends on them (text: their tokenizer; synthetic: their ids)."""
    if data == "synthetic":
        return (data, rcfg.task_vocab, rcfg.offset)
    if data == "default" or (Path(data) / "meta.json").is_file():
        return (data,)
    return (data, entry.name)


def _check_tokenizer(entry: ModelEntry, stream) -> None:
    """A prepared folder and a model folder that both carry a SentencePiece model must carry the same one."""
    from data_pipeline.tokenizer import file_sha256

    own = entry.path / "tokenizer.model"
    data_sha = getattr(stream, "tokenizer_sha256", None)
    if data_sha and own.is_file() and file_sha256(own) != data_sha:
        raise EvalError(f"{entry.name}'s tokenizer.model is not the tokenizer of {stream.name}: "
                        "its ids would mean other tokens")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line, exit 2 (like the trainer and the exporter)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # the default where there is one and the help does not name it
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0],
                formatter_class=_Formatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="Hugging Face folder(s) to evaluate")
    p.add_argument("--compare", action="append", metavar="DIR", help="another model folder for the same plots "
                   "(repeatable; same as another MODEL_DIR)")
    p.add_argument("--names", help="comma-separated display names, one per model (default: folder names)")
    p.add_argument("--data", help="held-out data for ppl: a prepared folder, 'default', 'synthetic', or a "
                   ".txt/.jsonl/.parquet file or folder (tokenized with each model's tokenizer)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="split of a prepared folder / default")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column of text files")
    p.add_argument("--lengths", default="1024,4096,16384", help="comma-separated window lengths in tokens")
    p.add_argument("--tasks", default="ppl,mqar,passkey", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, default=16, help="ppl windows per length (fewer if the data has fewer)")
    p.add_argument("--align", default="stream", choices=ALIGNS,
                   help="ppl windows: back to back in the token stream, or each at the start of a long enough document")
    p.add_argument("--buckets", default="log", help="position buckets: 'log' ([0,16), [16,32), ...) or a width")
    p.add_argument("--recall-samples", type=int, default=64, help="samples per recall task and length")
    p.add_argument("--mqar-pairs", type=int, default=8, help="key-value pairs per MQAR sample")
    p.add_argument("--passkey-digits", type=int, default=5, help="digits of the passkey")
    p.add_argument("--passkey-depths", default="random",
                   help="'random' (per sample) or comma-separated needle depths in [0, 1], one row each")
    p.add_argument("--task-vocab", type=int, default=None,
                   help="ids used by the synthetic tasks and --data synthetic (default 256, or what fits)")
    p.add_argument("--task-offset", default="auto", help="first id of the tasks' range in the model's vocabulary "
                   "('auto': 0, moved past the tokenizer's special tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (its val samples are used)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward call")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="run each window in pieces of N tokens, carrying the state (memory_state / KV cache)")
    p.add_argument("--reset", default="boundary",
                   help="this project's models: memory restarts at each document start ('boundary': after EOS, as "
                        "in training), 'every:N' tokens, or 'never' (the window read as one sequence)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (under torchrun; models of this project)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the folders' own model code (third-party)")
    p.add_argument("--out", default="outputs/eval", help="folder for the CSVs, plots and results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars or result lines")
    return p


def main(argv=None) -> int:
    from data_pipeline.errors import DataError

    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                written = write_outputs(Path(args.out), results)
            except OSError as exc:
                raise EvalError(f"cannot write the results to {args.out}: {exc}") from None
            for path in written:
                if not args.quiet:
                    info(f"wrote {path}")
        return 0
    except (EvalError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from parallel.groups import destroy_parallel

            destroy_parallel(destroy_process_group=True)


if __name__ == "__main__":
    sys.exit(main())
