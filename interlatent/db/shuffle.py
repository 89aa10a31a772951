"""Sequence blocks in, fixed-size chunks of rows out, optionally shuffled within a bounded buffer.

Training streams a layer as ``[chunk_size, channels]`` chunks. Blocks (one per sequence, of any
length, for one or several row-aligned layers) are gathered until the buffer holds
``buffer_rows`` rows (``chunk_size`` without shuffling); the buffer is then permuted (with
shuffling), cut into full chunks, and the rows left over wait for the next blocks. The last chunk
may be short. Memory is bounded by the buffer; the reading order of the sequences is the caller's
(the store permutes it with the same generator before reading).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def rechunk(
    blocks: Iterable[tuple[list[np.ndarray], np.ndarray]],
    chunk_size: int,
    *,
    rng: np.random.Generator | None = None,
    buffer_rows: int = 262_144,
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """``(arrays, row_ids)`` chunks of ``chunk_size`` rows from ``(arrays, row_ids)`` blocks.

    Every block holds one ``[rows, ...]`` array per stream (their rows aligned) and its ``row_ids``
    ``[rows, ...]``; with ``rng`` the rows are shuffled within a buffer of ``buffer_rows``."""
    buffer = _Buffer()
    limit = buffer_rows if rng is not None else chunk_size
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
