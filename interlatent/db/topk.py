"""The ``top`` highest activations of every channel over a stream of sequence blocks.

Each channel keeps its best ``top`` values with the sequence and row each came from. Blocks are
gathered until ``merge_rows`` rows wait, then merged into the running best with one
``argpartition`` per merge, so memory stays at ``(top + merge_rows) x channels``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class TopExamples(NamedTuple):
    """Per channel, its best values, best first: each field is ``[<= top, channels]``."""

    values: np.ndarray  # float32; -inf where a channel has fewer rows than ``top``
    seq_ids: np.ndarray  # int64: the sequence of each value
    rows: np.ndarray  # int64: the row (position index) inside that sequence


class TopK:
    """Running top-``top`` values per channel of ``[rows, width]`` blocks."""

    def __init__(self, width: int, top: int, merge_rows: int = 8192) -> None:
        self.width, self.top, self.merge_rows = width, top, merge_rows
        self.values = np.full((0, width), -np.inf, dtype=np.float32)
        self.seq_ids = np.zeros((0, width), dtype=np.int64)
        self.rows = np.zeros((0, width), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, int]] = []
        self._pending_rows = 0

    def add(self, block: np.ndarray, seq_id: int) -> None:
        """Offer the ``[rows, width]`` block of sequence ``seq_id``."""
        self._pending.append((block, seq_id))
        self._pending_rows += block.shape[0]
        if self._pending_rows >= self.merge_rows:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        shape = (self.width,)
        v = np.concatenate([self.values, *(b for b, _ in self._pending)])
        s = np.concatenate([self.seq_ids, *(np.full((b.shape[0], *shape), sid) for b, sid in self._pending)])
        p = np.concatenate([self.rows, *(np.broadcast_to(np.arange(b.shape[0])[:, None], (b.shape[0], *shape))
                                         for b, _ in self._pending)])
        if v.shape[0] > self.top:
            part = np.argpartition(-v, self.top - 1, axis=0)[: self.top]
            v, s, p = (np.take_along_axis(a, part, axis=0) for a in (v, s, p))
        self.values, self.seq_ids, self.rows = v, s, p
        self._pending.clear()
        self._pending_rows = 0

    def result(self) -> TopExamples:
        """The best values of every channel, sorted best first (ties keep their merge order)."""
        self._merge()
        order = np.argsort(-self.values, axis=0, kind="stable")
        return TopExamples(*(np.take_along_axis(a, order, axis=0) for a in (self.values, self.seq_ids, self.rows)))
