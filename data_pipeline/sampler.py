"""A deterministic, resumable sampler that splits each global batch across data-parallel ranks."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .errors import DataConfigError, DataError


class ResumableSampler:
    """Yields, per training step, this DP rank's sample indices of the next global batch.

    Epoch ``e`` visits the samples in the order ``permutation(seed + e)`` (or in order when
    ``shuffle=False``); global batch ``b`` of the epoch is positions ``[b*G, (b+1)*G)`` of that
    order and DP rank ``r`` takes its contiguous ``G / dp_size`` rows. An incomplete last batch
    is skipped; iteration continues with the next epoch forever.

    The position is kept as *global samples consumed* (in the epoch, plus the epoch), so it is
    independent of how the batch is divided: a run resumed with another ``dp_size`` (or even
    another ``global_batch_size``) continues at exactly the next global sample.

    ``step_size`` (a multiple of ``global_batch_size``; default: equal to it) is the number of
    samples of one optimizer step, i.e. ``global_batch_size × gradient accumulation``: an epoch
    ends after its last whole step, so the samples of each step do not depend on how a fixed
    global batch is split into DP ranks × accumulation (elastic resume).

    ``layout="streaming"`` (for a memory carried across steps): the samples are cut into
    ``G = global_batch_size`` contiguous lanes of ``L = num_samples // G`` samples, and row ``j`` of
    batch ``s`` is sample ``j·L + s`` — row j of step s+1 continues row j of step s in the token
    stream (samples tile it without gaps); an epoch is L batches, the same every epoch.
    """

    LAYOUTS = ("shuffled", "streaming")

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, layout: str = "shuffled", step_size: int | None = None):
        if global_batch_size <= 0 or dp_size <= 0 or global_batch_size % dp_size:
            raise DataConfigError(f"global batch size {global_batch_size} is not divisible by DP size {dp_size}")
        step_size = step_size or global_batch_size
        if step_size % global_batch_size:
            raise DataConfigError(f"samples per step {step_size} is not a multiple of the batch {global_batch_size}")
        if num_samples < step_size:
            raise DataError(f"the dataset has {num_samples} sequences, fewer than one global batch of "
                            f"{step_size}; use more data, a shorter sequence or a smaller batch")
        if not 0 <= dp_rank < dp_size:
            raise DataConfigError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if layout not in self.LAYOUTS:
            raise DataConfigError(f"unknown sample layout {layout!r}; expected one of {self.LAYOUTS}")
        self.layout = layout
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        # samples of an epoch that are used: whole optimizer steps (streaming: whole lanes)
        self.epoch_samples = num_samples if layout == "streaming" else num_samples // step_size * step_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.samples_in_epoch = 0
        self.consumed_samples = 0  # global samples handed out since the start of training
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.layout == "streaming":
                lanes, length = self.global_batch_size, self.num_samples // self.global_batch_size
                self._order = np.arange(lanes * length).reshape(lanes, length).T.reshape(-1)
            elif self.shuffle:
                self._order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def global_batch(self) -> np.ndarray:
        """Indices of the next whole global batch (all ranks), without advancing."""
        epoch, pos = self.epoch, self.samples_in_epoch
        if pos + self.global_batch_size > self.epoch_samples:
            epoch, pos = epoch + 1, 0
        return self.epoch_order(epoch)[pos:pos + self.global_batch_size]

    def next_batch(self) -> list[int]:
        """This rank's indices of the next global batch; advances the position."""
        if self.samples_in_epoch + self.global_batch_size > self.epoch_samples:
            self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        rows = self.global_batch()
        self.samples_in_epoch += self.global_batch_size
        self.consumed_samples += self.global_batch_size
        local = self.local_batch_size
        return rows[self.dp_rank * local:(self.dp_rank + 1) * local].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle, "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses one saved over different data or seed."""
        for key in ("num_samples", "seed", "shuffle", "layout"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data position: it was saved with {key}={state[key]}, "
                                f"this run has {key}={getattr(self, key)} (different data or settings)")
        if not 0 <= state["samples_in_epoch"] <= self.num_samples:
            raise DataError(f"saved data position {state['samples_in_epoch']} outside the epoch")
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self.consumed_samples = int(state.get("consumed_samples", 0))
