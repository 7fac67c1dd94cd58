"""The mixer contract, the states mixers carry between calls, and the one set of tree helpers
every state uses.

The mixer contract every memory layer follows: a call is prepare → scan → output.

    inputs           = prepare(x, state)        everything parallel over tokens: projections, short
                                                convs, heads, normalisation, gates, sliding-window
                                                attention; reads only the state's halos and position
    outputs, state'  = scan(inputs, state)      the only sequential part: the inner loop from the
                                                state's fast weights / optimizer state
    y                = output(x, outputs)       norms, gates, output projection (parallel over tokens)

``inputs`` is a tuple whose first item is a tensor that ``scan`` consumes and whose last item is
the *halo*: ``{group: value}`` for the state groups that depend on the tokens alone (``conv``:
causal-conv tails, ``cache``: sliding-window keys/values), which ``scan`` writes into ``state'``
and which the next call's ``prepare`` reads back. Context parallelism (parallel/context.py) uses
exactly this split: the halo goes to the next rank right after ``prepare``, the rest of the state
right after ``scan``, and a rank waits for its predecessor only right before its own ``scan``.

A state tree is ``None``, a tensor, a dict of trees, or a state object (``LayerState``,
``ttt.TTTState``, ``varlen.RowStates``) with ``.map`` / ``.tensors``. Only torch is imported:
this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .scan import chunk_sizes


def map_tree(tree, fn):
    """The same tree with ``fn`` applied to every tensor."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: map_tree(v, fn) for k, v in tree.items()}
    if hasattr(tree, "map"):
        return tree.map(fn)
    return fn(tree)


def named_tensors(tree, prefix: str = "") -> dict:
    """Flat dotted name → tensor of a tree, e.g. ``opt.momentum.W1``."""
    if tree is None:
        return {}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(named_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if hasattr(tree, "tensors"):
        return {f"{prefix}.{k}" if prefix else k: t for k, t in tree.tensors().items()}
    return {prefix: tree}


class StateTree:
    """Base of the state dataclasses: every field but ``position`` (an int) is a tree of tensors."""

    def _groups(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "position"}

    def tensors(self) -> dict:
        """Flat name → tensor view (for communication and checkpoints), e.g. ``opt.momentum.W1``."""
        return named_tensors(self._groups())

    def map(self, fn):
        """A new state with ``fn`` applied to every tensor (e.g. ``.detach``, ``index_select``)."""
        return replace(self, **{g: map_tree(t, fn) for g, t in self._groups().items()})


@dataclass
class LayerState(StateTree):
    """What a mixer carries from one call to the next (tensors are [B, H, ...] or [B, C, K−1]).

    weights:  the fast weights after the last token (float32), e.g. {"S"} or {"W1", "W2"}
    anchor:   the fast weights at the start of the current chunk, where gradients are taken
              (frozen-gradient chunking); None at a chunk boundary (then it equals ``weights``)
    opt:      inner-optimizer state: momentum, pending gradient sums of an unfinished chunk, …
    conv:     tails of causal convolutions (a halo: the Mixer contract below)
    cache:    attention keys/values of the last window−1 tokens (post-RoPE), {"k", "v"}
    extra:    anything else a composite mixer keeps (e.g. MAC's segment-start memory)
    position: tokens consumed so far
    """

    weights: dict = field(default_factory=dict)
    anchor: dict | None = None
    opt: dict = field(default_factory=dict)
    conv: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    position: int = 0


class Mixer(nn.Module):
    """Base class of the memory mixers: ``forward(x, state) -> (y, state)`` = prepare → scan → output.

    A subclass defines ``init_state(batch_size)``, ``prepare``, ``scan`` and ``output``; its state
    is a dataclass (``LayerState`` or ``TTTState``) with a ``position`` field and the halo groups.

    ``checkpoint_tokens`` > 0 (set by ``build_mixer`` from ``scan_checkpoint_group_size``) is scan
    checkpointing: in training the call runs in pieces of that many tokens (cut at multiples of it),
    each under ``torch.utils.checkpoint``, so the backward keeps only the states between pieces and
    recomputes one piece's inner loop at a time (the state API makes the pieces equal one call)."""

    checkpoint_tokens: int = 0

    def init_state(self, batch_size: int):
        raise NotImplementedError(f"{type(self).__name__} defines no init_state")

    def prepare(self, x: torch.Tensor, state) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} defines no prepare")

    def scan(self, inputs: tuple, state):
        raise NotImplementedError(f"{type(self).__name__} defines no scan")

    def output(self, x: torch.Tensor, outputs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no output")

    def halo_state(self, batch_size: int, halo: dict, position: int):
        """The state ``prepare`` needs at ``position`` given only the previous piece's halo."""
        return replace(self.init_state(batch_size), position=position, **halo)

    def forward(self, x: torch.Tensor, state=None):
        """x: [B, T, C] → (y [B, T, C], the state after the last token)."""
        state = state if state is not None else self.init_state(x.shape[0])
        span = self.checkpoint_tokens
        if not (span and self.training and torch.is_grad_enabled() and x.shape[1] > span):
            return self._call(x, state)
        ys = []
        for piece in x.split(chunk_sizes(state.position, x.shape[1], span), dim=1):  # split, not slices: one cat in the backward
            y, state = checkpoint(self._call, piece, state, use_reentrant=False)
            ys.append(y)
        return torch.cat(ys, 1), state

    def _call(self, x: torch.Tensor, state):
        outputs, state = self.scan(self.prepare(x, state), state)
        return self.output(x, outputs), state
