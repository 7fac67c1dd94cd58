"""FP8 training of the dense projections and MLPs, behind one switch (``--precision fp8``).

Two back-ends (``--fp8-backend``):
- ``te`` — NVIDIA Transformer Engine: every eligible ``nn.Linear`` becomes a ``te.Linear`` holding
  the same weights, and the forward runs inside ``te.fp8_autocast`` with a ``DelayedScaling``
  (amax history) or ``Float8CurrentScaling`` (per-tensor, this step's amax) recipe (``--fp8-recipe``);
- ``torchao`` — ``torchao.float8.convert_to_float8_training`` swaps the same modules for
  ``Float8Linear`` (dynamic tensor-wise scaling); no context is needed.

Eligible: the q/k/v/o/gate projections of the memory layers and the MLPs' three matrices —
Linear layers whose both sizes are multiples of 16 (FP8 GEMM tiles). The LM head (its logits
feed a softmax over the vocabulary), the tiny per-head lr gate, the embedding, the norms and the
memory layer's inner loop (float32, see docs/training.md) stay in bf16/fp32.
Everything else runs under bf16 autocast. FP8 needs an FP8 tensor-core GPU (compute capability
≥ 8.9: Ada, Hopper, Blackwell); anywhere else :func:`check_available` raises one clear error.
Tensor parallelism replaces the Linear layers with megatron's parallel ones, which this module does
not convert: with ``--tp > 1`` FP8 is refused (a clear error) for now.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_SKIP = ("lm_head", "lr_gate")


class FP8Unavailable(RuntimeError):
    """FP8 was asked for where it cannot run."""


def _gpu_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is present"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no FP8 tensor cores (needs ≥ 8.9)"
    return True, ""


def check_available(backend: str, tp: int = 1) -> None:
    """Raises FP8Unavailable with one line saying why FP8 cannot run here."""
    ok, why = _gpu_ok()
    if not ok:
        raise FP8Unavailable(f"--precision fp8 needs an FP8-capable GPU (H100/H200/Ada/Blackwell) and "
                             f"{'Transformer Engine' if backend == 'te' else 'torchao'}, but {why}; "
                             f"use --precision bf16")
    if tp > 1:
        raise FP8Unavailable("--precision fp8 with --tp > 1 is not supported yet (the TP layers are megatron's); use --tp 1 or bf16")
    try:
        if backend == "te":
            import transformer_engine.pytorch  # noqa: F401
        else:
            from torchao.float8 import convert_to_float8_training  # noqa: F401
    except ImportError as exc:
        pkg = "transformer-engine[pytorch]" if backend == "te" else "torchao"
        raise FP8Unavailable(f"--precision fp8 --fp8-backend {backend} needs {pkg} ({exc}); "
                             f"install it (pip install '{pkg}') or use --precision bf16") from None


def eligible(name: str, module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not any(s in name.split(".")[-1] for s in _SKIP)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _swap_te(model: nn.Module) -> int:
    import transformer_engine.pytorch as te

    count = 0
    for name, module in list(model.named_modules()):
        if not eligible(name, module):
            continue
        new = te.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        params_dtype=module.weight.dtype, device=module.weight.device)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        count += 1
    return count


def convert(model: nn.Module, backend: str, emulate: bool = False) -> int:
    """Swaps the eligible Linear layers in place; returns how many.

    torchao: ``pad_inner_dim`` pads the inner dimension of each FP8 GEMM to a multiple of 16, which
    the weight-gradient GEMM (inner dimension = tokens) needs whenever a call holds a token count
    that is not (packed documents run as segments of any length; found on an H200: ``_scaled_mm``
    refused 782 tokens). ``emulate``: torchao computes in float32 after the FP8 rounding (tests on CPU)."""
    if backend == "te":
        return _swap_te(model)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = [n for n, m in model.named_modules() if eligible(n, m)]
    config = Float8LinearConfig(pad_inner_dim=True, emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in names)
    return len(names)


def autocast(backend: str, recipe: str):
    """The context the forward runs in (bf16 autocast is entered by the caller)."""
    if backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    if recipe == "current":
        fp8_recipe = te_recipe.Float8CurrentScaling()
    else:
        fp8_recipe = te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, amax_history_len=16,
                                              amax_compute_algo="max")
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)
