"""The pipelines' training stream: exactly ``batch`` rows per step, resumable at any step.

Epoch ``e`` is one shuffled pass over the training prompts, drawn with seed ``seed + 1 + e`` by
the caller's ``chunks(seed, skip)`` (which starts after ``skip`` chunks of that pass); an epoch's remainder joins the next epoch's first rows, so no step
sees a handful of rows (whose variance, FVU's denominator, can be near zero). The position is
``(epoch, chunks read in it, rows held back)``: a restored stream re-opens that epoch past the
chunks already used (the store reads only what is still to come:
``iter_activation_chunks(skip_chunks=)``) and goes on with the saved rows, yielding exactly what
the uninterrupted stream would have. Under torch.distributed each
rank yields its rows of every global batch (:func:`.distributed.shard`); the position is global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from interlatent.analysis.train.distributed import shard

Chunks = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]


class BatchStream:
    """Global batches of ``batch`` rows from epoch-seeded passes ``chunks(seed + 1 + epoch, skip)``."""

    def __init__(self, chunks: Chunks, batch: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.chunks = chunks
        self.batch = batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.chunks_read = 0
        self.pending: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __iter__(self) -> Iterator[Any]:
        batch = self.batch
        while True:
            x, y = self.pending
            first = self.chunks_read  # past those used before the checkpoint this stream was restored from
            for i, (cx, cy) in enumerate(self.chunks(self.seed + 1 + self.epoch, first), start=first):
                x = cx if x is None else torch.cat([x, cx])
                y = cy if y is None else torch.cat([y, cy])
                self.chunks_read = i + 1
                self.pending = (x, y)
                while x.shape[0] >= batch:
                    out = x[:batch] if y is None else (x[:batch], y[:batch])
                    x, y = x[batch:], (None if y is None else y[batch:])
                    self.pending = (x, y) if x.shape[0] else (None, None)
                    yield out if self.world_size == 1 else shard(out, self.rank, self.world_size)
                x, y = self.pending
            self.epoch += 1
            self.chunks_read = 0

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The position as JSON plus the rows held back (``pending_x`` / ``pending_y``)."""
        x, y = self.pending
        tensors = {name: t for name, t in (("pending_x", x), ("pending_y", y)) if t is not None}
        return {"epoch": self.epoch, "chunks_read": self.chunks_read, "batch": self.batch, "seed": self.seed}, tensors

    def restore_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a position :meth:`checkpoint_state` returned."""
        self.epoch, self.chunks_read = int(meta["epoch"]), int(meta["chunks_read"])
        self.pending = (tensors.get("pending_x"), tensors.get("pending_y"))
