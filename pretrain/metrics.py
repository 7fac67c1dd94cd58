"""Metrics: FLOPs per token (for MFU), the device's peak, and the run's logs.

FLOP count (model FLOPs, the PaLM/Megatron convention: a multiply-add is 2 FLOPs; training is
forward + backward = 3 × forward; recomputation by activation/scan checkpointing is *not* counted,
so MFU does not reward recomputing). Per token, with hidden size C, heads H, head dim d = C/H,
vocabulary V, sequence length T:

    dense              2 × (in·out of every nn.Linear of the model, counted on a meta-device copy:
                       all projections, gates, MLPs of every mixer type) + the LM head 2·C·V
    causal convs       2·C·K per conv
    sequence mixing    per layer type (forward, per token):
      TTT-Linear       H (6d² + 4bd)        dual form per mini-batch b: K̃W, Q̃W 4bd², (ηK̃)ᵀG 2bd², QKᵀ, mask·G 4b²d
      TTT-MLP          H (14dm + 4b(d+m))   the same identity on both inner layers, m = inner width
      (Gated) DeltaNet H (6d² + 4cd)        chunk c: q·h, W·h, state update 6d²; intra-chunk 4cd
      Titans           H · 12P (+ attention for MAC/MAG/MAL)   P = memory-MLP parameters per head:
                       forward at the chunk's weights 2P, gradient 4P, read 2P, momentum/decay scans 4P
      LaCT             heads · 18·d·d_h (the authors' count: apply to keys 4, gradient 8, apply to
                       queries 6) + its sliding-window attention
      attention        4·C·T̄, T̄ the mean number of keys a causal query sees (window or full)
    embedding, norms, elementwise ops: not counted (a lookup; O(C) per token)

so training FLOPs per token = 3 × forward. MFU = achieved model FLOP/s ÷ the device's peak (GPU:
dense bf16/fp8 tensor-core peak from a table, per GPU; CPU: the measured float32 GEMM rate of
this process, so the CPU "MFU" is relative to what a large matmul achieves here; override either
with --peak-tflops).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

# dense (no sparsity) tensor-core peaks per GPU, FLOP/s
_GPU_PEAKS = {  # substring of torch.cuda.get_device_name() → {precision: peak}
    "H200": {"bf16": 989e12, "fp8": 1979e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp8": 1979e12, "fp32": 494e12},  # SXM; fp32 = TF32
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp8": 733e12, "fp32": 183e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
}


def _scan_flops(config, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's sequence mixing (everything but its Linear layers): the
    formula its layer type registered (models/layers/registry.py)."""
    from models.layers.registry import layer_spec

    return layer_spec(kind).flops(config, seq_len)


def flops_per_token(config, seq_len: int | None = None) -> dict:
    """Training FLOPs per token by part (see the module docstring); ``total`` is the sum.

    The dense part is counted from the model itself (every ``nn.Linear`` of a copy built on the
    meta device), so every mixer's projections are included; the sequence-mixing part follows
    each layer type's formula in :func:`_scan_flops`.
    """
    from models import MemoryLMForCausalLM
    from models.common.modules import CausalConv1d

    seq_len = seq_len or config.max_position_embeddings
    with torch.device("meta"):
        model = MemoryLMForCausalLM(config)
    dense = sum(m.in_features * m.out_features for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head")
    conv = sum(m.weight.shape[0] * m.weight.shape[-1] for m in model.modules() if isinstance(m, CausalConv1d))
    out = {
        "dense": 3 * 2 * dense,
        "conv": 3 * 2 * conv,
        "sequence_mixing": 3 * sum(_scan_flops(config, kind, seq_len) for kind in config.mixer_types),
        "lm_head": 3 * 2 * config.hidden_size * config.vocab_size,
    }
    out["total"] = sum(out.values())
    return out


_CPU_PEAK: float | None = None


def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s of this process (best of a few n×n matmuls), cached."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _CPU_PEAK = 2 * n**3 / best
    return _CPU_PEAK


def peak_flops(precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks.get(precision, peaks["bf16"]), f"{name} {precision} table"
        return math.nan, f"{name} (unknown peak: pass --peak-tflops)"
    return measured_cpu_peak(), "measured CPU fp32 GEMM"


def memory_stats() -> dict:
    """Peak memory of this process in GiB: GPU allocator peak, or CPU resident set."""
    if torch.cuda.is_available():
        return {"mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem_gib": rss_kib / 2**20}


class MetricsLogger:
    """metrics.jsonl (one JSON object per step, flushed), tensorboard, and a concise console line.

    Only the process that is asked to (global rank 0) writes. On resume, lines of steps after the
    checkpoint (written by the interrupted run after its last save) are dropped first, so the file
    reads as one uninterrupted run; tensorboard purges them with ``purge_step``.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int, total_steps: int,
                 log_every: int):
        self.enabled, self.total_steps, self.log_every = enabled, total_steps, log_every
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self._t0 = time.time()
        self._start_step = start_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line cut by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        if "loss" in record and (step % self.log_every == 0 or step == self.total_steps or step == self._start_step + 1):
            self.console(record)
        elif "val_loss" in record and "loss" not in record:
            print(f"step {step:>6} | val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}", flush=True)

    def console(self, r: dict) -> None:
        done = r["step"] - self._start_step
        elapsed = time.time() - self._t0
        eta = elapsed / max(done, 1) * (self.total_steps - r["step"])
        mfu = f" | mfu {100 * r['mfu']:.1f}%" if math.isfinite(r.get("mfu", math.nan)) else ""
        print(f"step {r['step']:>6}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
              f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s{mfu} | "
              f"{_hms(elapsed)} elapsed, eta {_hms(eta)}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def json_safe(record: dict) -> dict:
    """NaN and ±inf → null: metrics.jsonl stays valid JSON (Python's json would write bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def info(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
