"""The mixer contract every memory layer follows: a call is prepare → scan → output.

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

Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


class Mixer(nn.Module):
    """Base class of the memory mixers: ``forward(x, state) -> (y, state)`` = prepare → scan → output.

    A subclass defines ``init_state(batch_size)``, ``prepare``, ``scan`` and ``output``; its state
    is a dataclass (``LayerState`` or ``TTTState``) with a ``position`` field and the halo groups."""

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
        return dataclasses.replace(self.init_state(batch_size), position=position, **halo)

    def forward(self, x: torch.Tensor, state=None):
        """x: [B, T, C] → (y [B, T, C], the state after the last token)."""
        state = state if state is not None else self.init_state(x.shape[0])
        outputs, state = self.scan(self.prepare(x, state), state)
        return self.output(x, outputs), state
