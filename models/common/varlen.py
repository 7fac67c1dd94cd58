"""Packed documents: every sequence mixer restarts from its initial state at each document start.

A training row packs several documents. With ``doc_starts`` (bool [B, T], True where a new
document begins) each block behaves as if every document were run alone:

    row b = d₁ | d₂ | d₃   →   y[b] = f(d₁; s_b) | f(d₂; s₀) | f(d₃; s₀)

where f(·; s) is the block's sequence part (pre-conv + mixer) from state s, s_b the row's
incoming state (none: s₀) and s₀ the initial state (zero conv tails, initial fast weights,
empty attention cache, position 0: a chunk/mini-batch grid and RoPE restart at the document's
first token, wherever it falls). This works for every mixer without touching its kernels:
:func:`run_segments` cuts each row at its starts and runs the segments batched —

* segments whose final state is not needed go into right-padded batches (a causal layer's
  outputs do not depend on what follows them, so padding changes nothing that is kept; the
  padding repeats the row's last token, so every value stays finite and contributes exactly
  zero gradient); segments are sorted by length and split where a new call is cheaper than
  padding (:func:`call_cost_tokens`: a call costs more on a GPU, where it is launch-bound);
* segments that continue an incoming state are batched per incoming position;
* the last segment of each row, when the state is wanted, is batched only with segments of the
  same length and starting state (its final state must not see padding).

A left-padded row (``attention_mask`` ``0…0 1…1``, :func:`doc_starts_from_padding`) is the same
thing: its document starts at the first real token, so a padded batch gives each row's own results.

Rows whose final states stand at different positions cannot share one batched state (a state
has one ``position``): they come back as :class:`RowStates`, a per-row list with the same
``tensors()``/``map()`` interface, which every block accepts as its incoming state.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import map_tree, named_tensors


# Padding (in token rows) worth one more mixer call when grouping segments. CPU: a call's fixed cost
# is small against its per-token work. CUDA: a memory layer's call is a few hundred kernel launches
# (125m TTT-Linear on an H200: ~330 per layer call, ~2.3 ms of launching, against ~0.8 µs of device
# time per token: ≈ 2,900 tokens; bench.profile_step), so segments are grouped far more coarsely there
# and their padded length rounded up to PAD_MULTIPLE (full mini-batches for the Triton scans, FP8 GEMM
# tiles). The grouping changes the batch shapes only, never a result (causal maps; padding is cut).
CALL_COST_TOKENS = {"cpu": 256, "cuda": 4096}
PAD_MULTIPLE = {"cpu": 1, "cuda": 16}


def call_cost_tokens(device: torch.device) -> int:
    return CALL_COST_TOKENS.get(device.type, CALL_COST_TOKENS["cuda"])


@dataclass
class RowStates:
    """States of a batch whose rows are at different positions: ``rows[b]`` has batch size 1."""

    rows: list

    def tensors(self) -> dict:
        out = {}
        for b, row in enumerate(self.rows):
            for n, t in named_tensors(row).items():
                out[f"row{b}.{n}" if n else f"row{b}"] = t
        return out

    def map(self, fn) -> "RowStates":
        return RowStates([map_tree(r, fn) for r in self.rows])

    @property
    def position(self) -> list:
        return [position_of(r) for r in self.rows]


# ------------------------------------------------------------------------------- state trees
# A block state is a tree (models/common/state.py: map_tree, named_tensors).


def _leaves(tree) -> list:
    out: list = []
    map_tree(tree, lambda t: out.append(t) or t)
    return out


def position_of(tree):
    """Positions held in a state tree (those of its dict entries in order; one int for a layer state)."""
    if isinstance(tree, dict):
        got = [position_of(v) for v in tree.values()]
        got = [p for p in got if p is not None]
        return got[0] if len(got) == 1 else (tuple(got) if got else None)
    return getattr(tree, "position", None)


def signature(tree) -> tuple:
    """Equal signatures ⇔ states that can be stacked into one batch (same positions and shapes)."""
    return position_of(tree), tuple((tuple(t.shape[1:]), t.dtype) for t in _leaves(tree))


def split_rows(state, batch: int) -> list:
    """A batched state (or RowStates, or None) → one batch-1 state per row."""
    if state is None:
        return [None] * batch
    if isinstance(state, RowStates):
        if len(state.rows) != batch:
            raise ValueError(f"memory state holds {len(state.rows)} rows, the input {batch}")
        return list(state.rows)
    return [map_tree(state, lambda t, b=b: t[b:b + 1]) for b in range(batch)]


def stack_rows(rows: list):
    """Batch-1 states of equal signature → one batched state."""
    if len(rows) == 1:
        return rows[0]
    columns = list(zip(*(_leaves(r) for r in rows)))
    stacked = iter([torch.cat(c, 0) for c in columns])
    return map_tree(rows[0], lambda t: next(stacked))


def merge_rows(rows: list):
    """Per-row final states → one batched state if they line up, else :class:`RowStates`."""
    sig = signature(rows[0])
    if all(signature(r) == sig for r in rows[1:]):
        return stack_rows(rows)
    return RowStates(rows)


def doc_starts_from_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document ids [B, T] → starts [B, T]: True where the id changes (column 0: False, i.e. the
    row continues its incoming state; with no incoming state it starts fresh anyway)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
    starts = torch.zeros(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def doc_starts_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """flash-attn / fla style cumulative lengths [N+1] of one flattened row → starts [1, total]."""
    cu = cu_seqlens.to(torch.long).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {total}, got {cu.tolist()}")
    starts = torch.zeros(1, total, dtype=torch.bool, device=cu.device)
    starts[0, cu[:-1][cu[:-1] < total]] = True
    starts[0, 0] = False
    return starts


def doc_starts_from_padding(attention_mask: torch.Tensor, allow_right: bool) -> torch.Tensor | None:
    """An attention mask [B, T] (1: token, 0: pad) → document starts [B, T], or None if nothing is padded.

    Left padding (each row ``0…0 1…1``) is exact: the row's document starts at its first real token
    (the pads before it form a separate segment whose outputs are ignored), so every mixer — chunk
    grids, RoPE positions, conv tails — starts there as if the row were alone. Right padding
    (``1…1 0…0``) leaves the outputs of the real tokens exact (causal layers never look ahead) but
    not a final state, which would take in the pads: allowed only with ``allow_right``.
    Anything else (a hole inside a row, a row without tokens) cannot be exact: ValueError."""
    real = attention_mask.detach().to("cpu").bool()
    if real.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(real.shape)}")
    if bool(real.all()):
        return None
    if not bool(real.any(1).all()):
        raise ValueError(f"attention_mask: rows {torch.nonzero(~real.any(1)).flatten().tolist()} have no real token")
    if bool((real[:, 1:] >= real[:, :-1]).all()):  # left padding
        starts = torch.zeros(real.shape, dtype=torch.bool)
        starts[torch.arange(real.shape[0]), real.to(torch.int8).argmax(1)] = True
        return starts
    if bool((real[:, 1:] <= real[:, :-1]).all()):  # right padding
        if not allow_right:
            raise ValueError("right padding: the memory state would take in the pads. Pad on the left "
                             "(tokenizer.padding_side = 'left'), exact for generation and training, or pass "
                             "use_cache=False")
        return None
    raise ValueError("attention_mask must pad on the left (each row 0…0 1…1): a row with pads between its "
                     "tokens cannot run as one document")


def needs_segments(starts: torch.Tensor | None, state) -> bool:
    """Whether a call must take the segment path (else it is exactly the plain call)."""
    if isinstance(state, RowStates):
        return True
    if starts is None:
        return False
    if state is None:
        return bool(starts[:, 1:].any())
    return bool(starts.any())


# ---------------------------------------------------------------------------------- the runner
def _length_groups(lengths: list, call_cost: int = CALL_COST_TOKENS["cpu"]) -> list:
    """Indices (into ``lengths``) split into batches: sorted by length, cut where the padding saved
    exceeds ``call_cost`` tokens (optimal over contiguous splits of the sorted order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # batch = order[i:j], padded to lengths[order[i]]
            cost = best[i] + lengths[order[i]] * (j - i) + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _plan(jobs: list, call_cost: int = CALL_COST_TOKENS["cpu"]) -> list:
    """Jobs (row, begin, end, initial state or None, final state wanted) → batches (indices,
    keep the state): by starting state, then by length (exact for kept states)."""
    batches: dict = {}
    for j, (b, a, e, init, final) in enumerate(jobs):
        key = (init is not None, signature(init) if init is not None else None, (e - a) if final else None)
        batches.setdefault(key, []).append(j)
    split = []
    for key, idx in batches.items():
        if key[2] is not None:  # equal lengths: no padding, the state is kept
            split.append((idx, True))
        else:
            split.extend(([idx[i] for i in g], False)
                         for g in _length_groups([jobs[j][2] - jobs[j][1] for j in idx], call_cost))
    return split


def run_segments(fn, x: torch.Tensor, starts: torch.Tensor, state=None, need_state: bool = True):
    """``fn(x, state) -> (y, state)`` (a causal sequence map) applied to every document of every
    row of ``x`` [B, T, C] separately; ``starts`` [B, T] marks document starts (column 0 True:
    that row ignores its incoming state). Returns (y [B, T, C'], final state or None).

    ``state`` may be a zero-argument callable returning it: it is called (always, once) after the
    segments that start fresh have run — under CP the receive from the previous rank then waits
    behind this rank's own documents."""
    B, T = starts.shape
    starts_cpu = starts.detach().to("cpu", torch.bool)
    lazy = callable(state) and not isinstance(state, torch.Tensor)
    fresh, cont = [], []  # (row, begin, end, final state wanted)
    for b in range(B):
        cuts = [0, *[t for t in torch.nonzero(starts_cpu[b]).flatten().tolist() if t > 0], T]
        for a, e in zip(cuts[:-1], cuts[1:]):
            continues = a == 0 and not bool(starts_cpu[b, 0]) and state is not None
            (cont if continues else fresh).append((b, a, e, need_state and e == T))

    pad_multiple = PAD_MULTIPLE.get(x.device.type, PAD_MULTIPLE["cuda"])
    ar = torch.arange(-(-T // pad_multiple) * pad_multiple, device=x.device)
    pieces, where = [], torch.empty(B * T, dtype=torch.long)
    finals: list = [None] * B
    offset = 0

    def run(jobs):
        nonlocal offset
        for idx, keep_state in _plan(jobs, call_cost_tokens(x.device)):
            L = max(jobs[j][2] - jobs[j][1] for j in idx)
            if not keep_state:  # padded anyway: round up (the state kept needs the exact length)
                L = -(-L // pad_multiple) * pad_multiple
            rows = torch.tensor([jobs[j][0] for j in idx], device=x.device)
            begin = torch.tensor([jobs[j][1] for j in idx], device=x.device)
            cols = (begin[:, None] + ar[None, :L]).clamp(max=T - 1)
            inits = [jobs[j][3] for j in idx]
            y, st = fn(x[rows[:, None], cols], stack_rows(inits) if inits[0] is not None else None)
            pieces.append(y.reshape(len(idx) * L, *y.shape[2:]))
            for n, j in enumerate(idx):
                b, a, e, _, final = jobs[j]
                where[b * T + a: b * T + e] = torch.arange(offset + n * L, offset + n * L + e - a)
                if final and keep_state:
                    finals[b] = map_tree(st, lambda t, n=n: t[n:n + 1])
            offset += len(idx) * L

    run([(b, a, e, None, final) for b, a, e, final in fresh])
    if lazy:
        state = state()
    if cont:
        rows_in = split_rows(state, B)
        run([(b, a, e, rows_in[b], final) for b, a, e, final in cont])
    y = torch.cat(pieces, 0)[where.to(x.device)].view(B, T, *pieces[0].shape[1:])
    return y, (merge_rows(finals) if need_state else None)
