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
    start: tuple[list[np.ndarray], np.ndarray, int] | None = None,
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """``(arrays, row_ids)`` chunks of ``chunk_size`` rows from ``(arrays, row_ids)`` blocks.

    Every block holds one ``[rows, ...]`` array per stream (their rows aligned) and its ``row_ids``
    ``[rows, ...]``; with ``rng`` the rows are shuffled within a buffer of ``buffer_rows``.
    ``start`` continues a stream where :func:`fast_forward` found it: ``(arrays, row_ids, ready)``
    of the rows it holds (their first ``ready`` are yielded now, the rest wait in the buffer), and
    ``blocks`` are the blocks after them."""
    buffer = _Buffer()
    limit = buffer_rows if rng is not None else chunk_size
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
    """Blocks waiting to be cut into chunks."""

    def __init__(self) -> None:
        self.arrays: list[list[np.ndarray]] = []  # per stream, its blocks
        self.ids: list[np.ndarray] = []
        self.rows = 0

    def add(self, arrays: list[np.ndarray], ids: np.ndarray) -> None:
        if not self.arrays:
            self.arrays = [[] for _ in arrays]
        for stream, block in zip(self.arrays, arrays):
            stream.append(block)
        self.ids.append(ids)
        self.rows += ids.shape[0]

    def drain(self, chunk_size: int, rng: np.random.Generator | None,
              keep_tail: bool) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """Full chunks of what is buffered (and, unless ``keep_tail``, the short rest)."""
        if not self.ids:
            return
        arrays = [np.concatenate(stream) for stream in self.arrays]
        ids = np.concatenate(self.ids)
        if rng is not None:
            perm = rng.permutation(ids.shape[0])
            arrays = [a[perm] for a in arrays]
            ids = ids[perm]
        n_full = ids.shape[0] // chunk_size * chunk_size if keep_tail else ids.shape[0]
        for start in range(0, n_full, chunk_size):
            stop = min(start + chunk_size, n_full)
            yield [a[start:stop] for a in arrays], ids[start:stop]
        tail = keep_tail and n_full < ids.shape[0]
        self.arrays = [[a[n_full:]] if tail else [] for a in arrays]
        self.ids = [ids[n_full:]] if tail else []
        self.rows = ids.shape[0] - n_full if tail else 0


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
