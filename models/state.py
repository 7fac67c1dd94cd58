"""The state every non-TTT mixer carries between calls (TTT keeps its own ``TTTState``).

Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _map_tree(tree, fn):
    if tree is None:
        return None
    if isinstance(tree, LayerState):
        return tree.map(fn)
    if isinstance(tree, dict):
        return {n: _map_tree(t, fn) for n, t in tree.items()}
    return fn(tree)


def _flatten(prefix: str, tree, out: dict) -> None:
    if tree is None:
        return
    if isinstance(tree, LayerState):
        for n, t in tree.tensors().items():
            out[f"{prefix}.{n}"] = t
        return
    if isinstance(tree, dict):
        for n, t in tree.items():
            _flatten(f"{prefix}.{n}", t, out)
    else:
        out[prefix] = tree


@dataclass
class LayerState:
    """What a mixer carries from one call to the next (tensors are [B, H, ...] or [B, C, K−1]).

    weights:  the fast weights after the last token (float32), e.g. {"S"} or {"W1", "W2"}
    anchor:   the fast weights at the start of the current chunk, where gradients are taken
              (frozen-gradient chunking); None at a chunk boundary (then it equals ``weights``)
    opt:      inner-optimizer state: momentum, pending gradient sums of an unfinished chunk, …
    conv:     tails of causal convolutions
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

    GROUPS = ("weights", "anchor", "opt", "conv", "cache", "extra")

    def tensors(self) -> dict:
        """Flat name → tensor view (for communication and checkpoints), e.g. ``opt.momentum.W1``."""
        out: dict = {}
        for g in self.GROUPS:
            _flatten(g, getattr(self, g), out)
        return out

    def map(self, fn) -> "LayerState":
        """A new state with ``fn`` applied to every tensor (e.g. ``.detach``, ``index_select``)."""
        return LayerState(**{g: _map_tree(getattr(self, g), fn) for g in self.GROUPS}, position=self.position)
