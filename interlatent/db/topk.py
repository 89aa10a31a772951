"""The ``top`` highest activations of every channel over a stream of sequence blocks.

Each channel keeps its best ``top`` values with the sequence and row each came from. Blocks are
gathered until ``merge_rows`` rows wait, then merged into the running best with one
``argpartition`` per merge, so memory stays at ``(top + merge_rows) x channels``.

Ties are broken by sequence id, then row (the lower first), both in which values are kept and in
their order, so the result depends only on the values offered, not on how they were split into
blocks: partial results over disjoint sequences merge (:meth:`TopK.add_examples`) into exactly
the result of one pass over all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from interlatent.errors import ShapeError


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

    def add_examples(self, found: TopExamples) -> None:
        """Offer another :class:`TopK`'s result (over other sequences), as if its blocks were added here."""
        if found.values.ndim != 2 or found.values.shape[1] != self.width:
            raise ShapeError(f"top examples of {self.width} channels expected; got values of shape "
                             f"{tuple(found.values.shape)}: merge results of the same layer")
        self._merge()
        self._select(np.concatenate([self.values, found.values.astype(np.float32, copy=False)]),
                     np.concatenate([self.seq_ids, found.seq_ids]), np.concatenate([self.rows, found.rows]))

    def _merge(self) -> None:
        if not self._pending:
            return
        shape = (self.width,)
        v = np.concatenate([self.values, *(b for b, _ in self._pending)])
        s = np.concatenate([self.seq_ids, *(np.full((b.shape[0], *shape), sid) for b, sid in self._pending)])
        p = np.concatenate([self.rows, *(np.broadcast_to(np.arange(b.shape[0])[:, None], (b.shape[0], *shape))
                                         for b, _ in self._pending)])
        self._pending.clear()
        self._pending_rows = 0
        self._select(v, s, p)

    def _select(self, v: np.ndarray, s: np.ndarray, p: np.ndarray) -> None:
        """Keep the best ``top`` of each column: by value, ties by the lower (sequence, row)."""
        if v.shape[0] > self.top:
            part = np.argpartition(-v, self.top - 1, axis=0)[: self.top]
            kth = np.take_along_axis(v, part, axis=0).min(axis=0)  # the lowest value kept (NaN: all numbers are)
            # a tie at the cut: more values reach the lowest kept one than there are places
            for c in np.flatnonzero((v >= kth).sum(axis=0) > self.top):
                at = np.flatnonzero(v[:, c] >= kth[c])
                part[:, c] = at[np.lexsort((p[at, c], s[at, c], -v[at, c]))[: self.top]]
            v, s, p = (np.take_along_axis(a, part, axis=0) for a in (v, s, p))
        self.values, self.seq_ids, self.rows = v, s, p

    def result(self) -> TopExamples:
        """The best values of every channel, sorted best first, ties by sequence id then row."""
        self._merge()
        order = np.lexsort((self.rows, self.seq_ids, -self.values), axis=0)
        return TopExamples(*(np.take_along_axis(a, order, axis=0) for a in (self.values, self.seq_ids, self.rows)))
