"""First-order linear scans h_t = a_t h_{t−1} + x_t (the momentum and decay recurrences of Titans).

``linear_scan(gates, tokens)`` takes [B, C, T] tensors and scans along T. On CUDA it uses
``accelerated_scan``'s Triton kernel when that package is installed; everywhere else a pure-PyTorch
Hillis–Steele scan (log₂T steps, each a few elementwise ops, differentiable). Its CUDA C++ ``warp``
kernel is not used: importing it compiles an extension with nvcc (minutes, on every fresh machine;
measured on an H200, docs/benchmarks.md). Only torch is imported at module level: this file is copied
into exported Hugging Face folders, which must work without ``accelerated_scan``.
"""
from __future__ import annotations

import torch


try:  # optional GPU kernel (imports triton)
    from accelerated_scan.scalar import scan as _triton_scan
except Exception:  # pragma: no cover - not installed, or no triton
    _triton_scan = None


def torch_linear_scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch inclusive scan of h_t = a_t h_{t−1} + x_t with h_{−1} = 0, along the last dim.

    Hillis–Steele doubling: after the step with offset s every position holds the composition of
    the (up to) 2s maps ending there, (A, X) ∘ (A', X') = (A A', A X' + X).
    """
    a, x = gates, tokens
    T = x.shape[-1]
    s = 1
    while s < T:
        a_prev = torch.nn.functional.pad(a[..., : T - s], (s, 0), value=1.0)
        x_prev = torch.nn.functional.pad(x[..., : T - s], (s, 0), value=0.0)
        x = a * x_prev + x
        a = a * a_prev
        s *= 2
    return x


def linear_scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t−1} + x_t along the last dim of [B, C, T] tensors (accelerated on CUDA)."""
    if tokens.is_cuda and _triton_scan is not None and tokens.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _triton_scan(gates.contiguous(), tokens.contiguous())
    return torch_linear_scan(gates, tokens)


def chunk_sizes(position: int, length: int, chunk: int) -> list[int]:
    """Lengths of the pieces of ``length`` tokens that start at absolute ``position``, cut at every
    multiple of ``chunk`` (the first piece ends the chunk begun before ``position``)."""
    if length <= 0:
        return []
    cuts = [0, *range(chunk - position % chunk, length, chunk), length]
    return [b - a for a, b in zip(cuts, cuts[1:])]


def split_chunks(sizes: list[int], *items, dim: int = 2) -> list[tuple]:
    """The items (tensors, or dicts of tensors) cut along ``dim`` into pieces of ``sizes``: one tuple
    per piece. ``torch.split``, not a slice per chunk: its backward is one concatenation, where n
    slices each write a zero-filled full-length gradient (n × the tensor in fill_ and adds)."""
    def cut(item):
        if isinstance(item, dict):
            parts = {n: cut(t) for n, t in item.items()}
            return [{n: p[i] for n, p in parts.items()} for i in range(len(sizes))]
        return item.split(sizes, dim)
    return list(zip(*(cut(item) for item in items)))
