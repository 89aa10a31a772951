"""Sequence blocks in, fixed-size chunks of rows out, optionally shuffled within a bounded buffer.

Training streams a layer as ``[chunk_size, channels]`` chunks. Blocks (one per sequence, of any
length, for one or several row-aligned layers) are gathered until the buffer holds
``buffer_rows`` rows (``chunk_size`` without shuffling); the buffer is then permuted (with
shuffling), cut into full chunks, and the rows left over wait for the next blocks. The last chunk
may be short. Memory is bounded by the buffer; the reading order of the sequences is the caller's
(the store permutes it with the same generator before reading).

:func:`fast_forward` finds, from the blocks' sizes alone, where the stream stands after its first
``skip`` chunks (drawing the same permutations), so a resumed stream reads only the rows still to
come: the buffer it is in the middle of, then the blocks after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def rechunk(
    blocks: Iterable[tuple[list[np.ndarray], np.ndarray]],
    chunk_size: int,
    *,
    rng: np.random.Generator | None = None,
    buffer_rows: int = 262_144,
    max_block_rows: int | None = None,
    start: tuple[list[np.ndarray], np.ndarray, int] | None = None,
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """``(arrays, row_ids)`` chunks of ``chunk_size`` rows from ``(arrays, row_ids)`` blocks.

    Every block holds one ``[rows, ...]`` array per stream (their rows aligned) and its ``row_ids``
    ``[rows, ...]``; with ``rng`` the rows are shuffled within a buffer of ``buffer_rows``.
    ``max_block_rows`` (the longest block, when the caller knows it) sizes the buffer once; else it
    grows when a longer block comes. Every chunk is a new array (the buffer is reused).
    ``start`` continues a stream where :func:`fast_forward` found it: ``(arrays, row_ids, ready)``
    of the rows it holds (their first ``ready`` are yielded now, the rest wait in the buffer), and
    ``blocks`` are the blocks after them."""
    limit = buffer_rows if rng is not None else chunk_size
    buffer = _Buffer(limit - 1 + max_block_rows if max_block_rows else 0)
    if start is not None:
        arrays, ids, ready = start
        for begin in range(0, ready, chunk_size):
            stop = min(begin + chunk_size, ready)
            yield [a[begin:stop] for a in arrays], ids[begin:stop]
        if ready < ids.shape[0]:
            buffer.add([a[ready:] for a in arrays], ids[ready:])
    for arrays, ids in blocks:
        buffer.add(arrays, ids)
        if buffer.rows >= limit:
            yield from buffer.drain(chunk_size, rng, keep_tail=True)
    yield from buffer.drain(chunk_size, rng, keep_tail=False)


class _Buffer:
    """Rows waiting to be cut into chunks, in one preallocated array per stream (and one of row ids).

    A drain permutes row numbers, not rows: each chunk is gathered from the buffer, and the rows
    left over move to its front, so memory stays at the buffer plus one chunk. The rows and their
    order are those of concatenating the waiting rows and indexing them with the permutation."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.arrays: list[np.ndarray] = []  # per stream, [capacity, ...]
        self.ids: np.ndarray | None = None
        self.rows = 0

    def _reserve(self, arrays: list[np.ndarray], ids: np.ndarray, need: int) -> None:
        if self.ids is not None and need <= self.ids.shape[0]:
            return
        capacity = max(need, self.capacity)
        grown = [np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for a in arrays]
        grown_ids = np.empty((capacity, *ids.shape[1:]), dtype=ids.dtype)
        if self.ids is not None:
            for new, old in zip(grown, self.arrays):
                new[: self.rows] = old[: self.rows]
            grown_ids[: self.rows] = self.ids[: self.rows]
        self.arrays, self.ids = grown, grown_ids

    def add(self, arrays: list[np.ndarray], ids: np.ndarray) -> None:
        n = ids.shape[0]
        self._reserve(arrays, ids, self.rows + n)
        for stream, block in zip(self.arrays, arrays):
            stream[self.rows : self.rows + n] = block
        self.ids[self.rows : self.rows + n] = ids  # type: ignore[index]
        self.rows += n

    def drain(self, chunk_size: int, rng: np.random.Generator | None,
              keep_tail: bool) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """Full chunks of what is buffered (and, unless ``keep_tail``, the short rest)."""
        if not self.rows or self.ids is None:
            return
        n = self.rows
        order: np.ndarray | None = rng.permutation(n) if rng is not None else None
        n_full = n // chunk_size * chunk_size if keep_tail else n

        def take(start: int, stop: int) -> tuple[list[np.ndarray], np.ndarray]:
            if order is None:
                return [a[start:stop].copy() for a in self.arrays], self.ids[start:stop].copy()  # type: ignore[index]
            rows = order[start:stop]
            return [a[rows] for a in self.arrays], self.ids[rows]  # type: ignore[index]

        for start in range(0, n_full, chunk_size):
            yield take(start, min(start + chunk_size, n_full))
        tail = n - n_full if keep_tail else 0
        if tail:
            rest, rest_ids = take(n_full, n)
            for stream, block in zip(self.arrays, rest):
                stream[:tail] = block
            self.ids[:tail] = rest_ids
        self.rows = tail


@dataclass
class Position:
    """Where :func:`rechunk` stands after some chunks: ``next_block`` blocks have been buffered, and
    ``rows`` (``[n, 2]``: block, row within it) are buffered rows in the order they come out, the
    first ``ready`` of them to be yielded before the next block is read."""

    next_block: int
    rows: np.ndarray
    ready: int


def fast_forward(sizes: Sequence[int], chunk_size: int, skip: int, *, rng: np.random.Generator | None = None,
                 buffer_rows: int = 262_144) -> Position:
    """The position of ``rechunk(blocks, chunk_size, rng=rng, buffer_rows=buffer_rows)`` after it
    yielded ``skip`` chunks, computed from the blocks' row counts ``sizes`` without their data;
    ``rng`` advances exactly as that many chunks of :func:`rechunk` would advance it."""
    limit = buffer_rows if rng is not None else chunk_size
    held: list[np.ndarray] = []
    rows = done = 0

    def drain(keep_tail: bool) -> Position | None:
        nonlocal held, rows, done
        if not held:
            return None
        order = np.concatenate(held)
        if rng is not None:
            order = order[rng.permutation(order.shape[0])]
        n_full = order.shape[0] // chunk_size * chunk_size if keep_tail else order.shape[0]
        here = -(-n_full // chunk_size)
        if done + here > skip:  # the skip ends inside this drain
            used = (skip - done) * chunk_size
            return Position(0, order[used:], n_full - used)
        done += here
        held = [order[n_full:]] if keep_tail and n_full < order.shape[0] else []
        rows = order.shape[0] - n_full if held else 0
        return None

    for block, size in enumerate(sizes):
        held.append(np.stack([np.full(size, block), np.arange(size)], axis=1).astype(np.int64))
        rows += size
        if rows >= limit and (found := drain(True)) is not None:
            found.next_block = block + 1
            return found
    found = drain(False)
    if found is not None:
        found.next_block = len(sizes)
        return found
    return Position(len(sizes), np.zeros((0, 2), dtype=np.int64), 0)
