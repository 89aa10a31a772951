"""The pipelines' training streams: exactly ``batch`` rows per step, resumable at any step.

:class:`BatchStream` reads one stream over all training prompts. Epoch ``e`` is one shuffled pass
over them, drawn with seed ``seed + 1 + e`` by the caller's ``chunks(seed, skip)`` (which starts
after ``skip`` chunks of that pass); an epoch's remainder joins the next epoch's first rows, so no
step sees a handful of rows (whose variance, FVU's denominator, can be near zero). The position is
``(epoch, chunks read in it, rows held back)``: a restored stream re-opens that epoch past the
chunks already used (the store reads only what is still to come:
``iter_activation_chunks(skip_chunks=)``) and goes on with the saved rows, yielding exactly what
the uninterrupted stream would have. Under torch.distributed each rank reads that whole stream and
yields its rows of every global batch (:func:`.distributed.shard`); the position is global.

:class:`PartitionedStream` splits the reading instead. The training prompts are dealt into ``P``
disjoint partitions (:func:`deal_prompts`: balanced by token count) and partition ``p`` is a
:class:`BatchStream` of its own over only its prompts: its own shuffle buffer (the pipelines give
each ``1/P`` of one stream's, so the ``P`` together hold what one stream would), its own epochs
(epoch ``e`` shuffled with :func:`partition_seed` of ``(seed + 1 + e, p)``), ``rows_of(B, p, P)``
rows per step (:func:`partition_rows`; they sum to ``B``). The global batch is the partitions'
batches concatenated in partition order. Under ``W`` ranks (``P`` a multiple of ``W``) rank ``r``
reads only partitions ``r*P/W ... (r+1)*P/W - 1`` and yields their concatenation, which is exactly
rows ``rows_of(B, r, W)`` of the global batch; one process reads all ``P`` and yields the whole
global batch, so both train on the same batches. The position is one per partition; under
torch.distributed :meth:`PartitionedStream.checkpoint_state` gathers every rank's partitions to
rank 0 (a collective: every rank calls it), so the checkpoint is the same as a one-process run's
and each rank restores its own partitions from it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from interlatent.analysis.train.distributed import gather_to_first, rows_of, shard
from interlatent.errors import CheckpointError, ConfigError

Chunks = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]
PartitionChunks = Callable[[int, int, int], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]
"""``chunks(partition, seed, skip)``: one seeded pass over a partition's prompts, past ``skip`` chunks."""


class BatchStream:
    """Global batches of ``batch`` rows from epoch-seeded passes ``chunks(seed + 1 + epoch, skip)``."""

    def __init__(self, chunks: Chunks, batch: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if batch < 1:
            raise ConfigError(f"a training stream needs at least 1 row per step, got batch={batch}")
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


def partition_rows(batch: int, parts: int) -> list[int]:
    """Rows per step of each of ``parts`` partitions of a ``batch``-row global batch (they sum to ``batch``)."""
    return [len(range(batch)[rows_of(batch, p, parts)]) for p in range(parts)]


def partition_seed(seed: int, partition: int) -> int:
    """The shuffling seed of one epoch of a partition, from the epoch's seed and the partition index."""
    return int(np.random.SeedSequence([seed, partition]).generate_state(1)[0])


def deal_prompts(prompts: Sequence[int], n_positions: Sequence[int], parts: int, seed: int) -> list[list[int]]:
    """Deal ``prompts`` into ``parts`` disjoint partitions balanced by token count (each sorted).

    Longest prompt first (prompts of equal length in an order drawn with ``seed``), each goes to
    the partition holding the fewest tokens so far (the lowest index among equals): the partitions'
    token counts differ by at most one prompt's length. Deterministic for a given input and seed."""
    if parts < 1:
        raise ConfigError(f"data_partitions must be >= 1, got {parts}")
    if len(prompts) < parts:
        raise ConfigError(f"data_partitions={parts} needs at least {parts} training prompts, but the training split "
                          f"has {len(prompts)}; pass fewer partitions")
    order = np.random.default_rng(seed).permutation(len(prompts))
    order = sorted(order.tolist(), key=lambda i: -int(n_positions[i]))  # stable: ties keep the seeded order
    lightest = [(0, p) for p in range(parts)]  # (tokens so far, partition): a heap, lightest first
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        load, p = heapq.heappop(lightest)
        members[p].append(int(prompts[i]))
        heapq.heappush(lightest, (load + int(n_positions[i]), p))
    return [sorted(m) for m in members]


def check_partitions(parts: int, world_size: int) -> None:
    """Refuse a number of data partitions that does not deal evenly among ``world_size`` ranks."""
    if parts < 1 or parts % world_size:
        raise ConfigError(f"data_partitions={parts} does not deal evenly among {world_size} ranks: pass a multiple "
                          f"of the world size ({world_size}, {2 * world_size}, ...), or 1 to have every rank read "
                          "the whole stream and keep its rows of each batch")


class PartitionedStream:
    """Global batches of ``batch`` rows, the concatenation of ``parts`` partition streams; under
    ``world_size`` ranks this rank's partitions only (see the module docstring)."""

    def __init__(self, chunks: PartitionChunks, parts: int, batch: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        check_partitions(parts, world_size)
        if batch < parts:
            raise ConfigError(f"a global batch of {batch} rows cannot give each of {parts} data partitions a row; "
                              f"pass batch_size >= {parts} or fewer partitions")
        self.parts, self.batch, self.seed = parts, batch, seed
        self.rank, self.world_size = rank, world_size
        per = parts // world_size
        self.owned = list(range(rank * per, (rank + 1) * per))
        """The partitions this rank reads."""
        rows = partition_rows(batch, parts)
        self.streams = [BatchStream(self._epochs(chunks, p), rows[p], seed) for p in self.owned]

    @staticmethod
    def _epochs(chunks: PartitionChunks, partition: int) -> Chunks:
        return lambda seed, skip: chunks(partition, partition_seed(seed, partition), skip)

    def __iter__(self) -> Iterator[Any]:
        streams = [iter(s) for s in self.streams]
        while True:
            got = [next(s) for s in streams]
            if isinstance(got[0], tuple):
                yield torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
            else:
                yield torch.cat(got)

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Every partition's position (``positions[p]``) and held-back rows (``p{p}.pending_x``).
        Under torch.distributed every rank must call it; rank 0's answer holds all partitions."""
        local = {p: s.checkpoint_state() for p, s in zip(self.owned, self.streams)}
        states: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
        if self.world_size > 1:
            for part in gather_to_first(local) or [local]:
                states.update(part)
        else:
            states = local
        if len(states) < self.parts:  # a rank other than 0: what it returns is not written
            return {}, {}
        meta = {"partitions": self.parts, "batch": self.batch, "seed": self.seed,
                "positions": [states[p][0] for p in range(self.parts)]}
        tensors = {f"p{p}.{k}": v for p in range(self.parts) for k, v in states[p][1].items()}
        return meta, tensors

    def restore_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue this rank's partitions from a position :meth:`checkpoint_state` returned."""
        if meta.get("partitions") != self.parts:
            saved = meta.get("partitions", 1)
            raise CheckpointError(f"the checkpoint's data stream has {saved!r} partitions, this run {self.parts}; "
                                  f"resume with data_partitions={saved!r} (--data-partitions {saved!r} on the command "
                                  "line)")
        for p, stream in zip(self.owned, self.streams):
            prefix = f"p{p}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            stream.restore_state(meta["positions"][p], own)
