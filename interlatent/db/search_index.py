"""The search index: per (layer, channel) the ``depth`` highest stored values, kept as data arrives.

Every dense layer gets one ``search_index_layers`` row (its depth, the number of sequences indexed,
the highest prompt index seen, per channel the lowest value kept at the last fold, and how many
entries wait in the log), one ``search_index`` row per channel holding up to ``depth`` entries
``(value float32, prompt_index int64, row int32)`` as a BLOB in (prompt_index, row) order, and
``search_index_log`` rows. The writer notes each stored ``[positions, channels]`` block
(:meth:`SearchIndex._index_block`); at the commit of the outermost transaction the blocks of each
layer are cut with vectorised numpy to the values that beat their channel's floor (and of those,
the batch's own best ``depth`` per channel), which go into one log row; once the log holds
``depth * width / 2`` entries it is folded into the channel rows, and the floors rise. All of it
happens inside the write's transaction, so a rolled-back write leaves no trace in the index, and a
rolled-back savepoint drops the blocks it noted. The blocks of one transaction wait in memory
until its commit (one write batch, as the writers use it). Queries read the channel rows and the
log: the log's floors are those of the last fold, lower than or equal to the true ones, so it may
hold more than needed but never misses an entry.

Order (the same in the full scan of :mod:`interlatent.vis.queries`): value descending, then prompt
index, then row (position) ascending, then channel ascending. NaN never ranks (it is no activation
to compare); +inf is the highest value, -inf the lowest; -0.0 and 0.0 are equal. A channel keeps
its ``depth`` best entries, or every non-NaN value when it has fewer; the top ``n <= depth`` of a
channel, and of a whole layer (each of its entries is among its own channel's top ``n``), are
answered exactly from it.

Layers of stores written before the index, and layers whose indexed sequence count no longer
matches the stored rows (written by code that bypassed the writer), are rebuilt by one scan:
:meth:`SearchIndex.build_index`, called on first query by a writable store. Sparse (TopK) layers
are not indexed; they keep their ``latent_examples``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from interlatent.db.columns import in_chunks
from interlatent.db.layers import LayerInfo
from interlatent.db.token_index import TokenIndex

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 128  # entries kept per channel: searches up to --top 128 answer from the index
ENTRY = np.dtype([("value", "<f4"), ("prompt", "<i8"), ("row", "<i4")])
LOGGED = np.dtype([("value", "<f4"), ("prompt", "<i8"), ("row", "<i4"), ("channel", "<i4")])
_NO_VALUE = np.iinfo(np.int32).min  # the rank of NaN and of empty slots: below -inf


def value_rank(values: np.ndarray) -> np.ndarray:
    """An int64 per float32 value with the order of the values: -0.0 equals 0.0, NaN ranks lowest."""
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 is +0.0
    bits = v.view(np.int32).astype(np.int64)
    rank = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return np.where(np.isnan(v), _NO_VALUE, rank)


class ChannelTops(NamedTuple):
    """Per channel its kept entries, padded to ``depth`` rows: each field is ``[depth, channels]``."""

    values: np.ndarray  # float32, NaN in empty slots
    prompts: np.ndarray  # int64
    rows: np.ndarray  # int64
    counts: np.ndarray  # int64 [channels]: the filled slots (first in each column)

    @classmethod
    def empty(cls, depth: int, width: int) -> ChannelTops:
        return cls(np.full((depth, width), np.nan, np.float32), np.zeros((depth, width), np.int64),
                   np.zeros((depth, width), np.int64), np.zeros(width, np.int64))

    def floor(self) -> np.ndarray:
        """Per channel the lowest kept value when full, else -inf (every value could enter)."""
        depth = self.values.shape[0]
        low = np.min(np.where(self.counts[None, :] > np.arange(depth)[:, None], self.values, np.inf), axis=0)
        return np.where(self.counts >= depth, low, -np.inf).astype(np.float32)


class Candidates(NamedTuple):
    """The entries of a block that may enter its channels' tops, per touched channel in (prompt, row)
    order: ``channels`` [touched], the rest ``[slots, touched]`` (NaN values in unused slots)."""

    channels: np.ndarray
    values: np.ndarray
    prompts: np.ndarray
    rows: np.ndarray


def _by_column(flat: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Trues of a ``[n, width]`` mask, given as flat indices (``np.flatnonzero``, far faster than a
    2-D ``nonzero``), by column then row: (rows, columns present, column number of each among those
    present, slot within its column)."""
    rows, cols = np.divmod(flat, width)
    order = np.argsort(cols, kind="stable")  # keeps row order within a column
    rows, cols = rows[order], cols[order]
    new_col = np.r_[True, cols[1:] != cols[:-1]] if cols.size else np.zeros(0, bool)
    starts = np.flatnonzero(new_col)
    number = np.cumsum(new_col) - 1
    return rows, cols[starts], number, np.arange(cols.size) - starts[number]


def _half_rank(bits: np.ndarray) -> np.ndarray:
    """int16 ranks of float16 bit patterns in the order of their values (-0.0 ranks just below 0.0;
    NaN anywhere): comparing them is far cheaper than widening the values to float32."""
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def _enters(values: np.ndarray, floor: np.ndarray, in_order: bool) -> np.ndarray:
    """Where ``values`` may enter tops with lowest kept values ``floor`` (-inf: not full; in order, a
    tie with a full channel's floor comes after it and cannot enter). NaN may be marked: callers
    drop it."""
    half = floor.astype(np.float16).astype(np.float32)
    if values.dtype == np.float16 and np.array_equal(half, floor):  # the same comparisons on int16 ranks
        zero = np.float16(0.0 if in_order else -0.0)  # ties with a zero floor: both zeros
        f = _half_rank(np.where(floor == 0, zero, floor.astype(np.float16)).astype(np.float16).view(np.int16))
        # above positive floors the raw bits already rank (negative values have the sign bit set)
        v = values.view(np.int16) if bool((floor > 0).all()) else _half_rank(values.view(np.int16))
    else:
        v, f = values, floor
    enters = v > f if in_order else v >= f
    open_slots = np.flatnonzero(floor == -np.inf)  # (or a full channel whose lowest value is -inf)
    if open_slots.size:
        enters[:, open_slots] = True
    return enters


def candidates(values: np.ndarray, prompts: np.ndarray, rows: np.ndarray, floor: np.ndarray, depth: int,
               in_order: bool) -> Candidates:
    """What of a ``[n, channels]`` block (row ``i`` from ``prompts[i]``, ``rows[i]``, in (prompt, row)
    order) can change tops whose lowest kept values are ``floor`` (-inf where not full): per channel
    the values that beat its floor, and of those only the block's own best ``depth``."""
    width = values.shape[1]
    enters = _enters(values, floor, in_order)
    flat = np.flatnonzero(enters)
    nan = np.isnan(values.reshape(-1)[flat])  # NaN never enters
    if nan.any():
        enters.reshape(-1)[flat[nan]] = False
        flat = flat[~nan]
    heavy = np.flatnonzero(np.bincount(flat % width, minlength=width) > depth)
    if heavy.size:  # keep the block's best depth of those channels: above its depth-th value, then ties
        values = values.astype(np.float32, copy=False)
        sub = np.where(enters[:, heavy], values[:, heavy], -np.inf)
        kth = np.partition(np.ascontiguousarray(sub.T), sub.shape[0] - depth, axis=1)[:, sub.shape[0] - depth]
        keep = sub > kth
        tie_rows, tie_cols, tie_number, tie_slot = _by_column(np.flatnonzero(enters[:, heavy] & (sub == kth)),
                                                              heavy.size)
        ok = tie_slot < depth - keep.sum(0)[tie_cols[tie_number]]
        keep[tie_rows[ok], tie_cols[tie_number[ok]]] = True
        enters[:, heavy] = keep & enters[:, heavy]
        flat = np.flatnonzero(enters)
    at, touched, col, slot = _by_column(flat, width)
    n_slots = int(slot.max()) + 1 if slot.size else 0
    out_v = np.full((n_slots, touched.size), np.nan, np.float32)
    out_p = np.zeros((n_slots, touched.size), np.int64)
    out_r = np.zeros((n_slots, touched.size), np.int64)
    out_v[slot, col] = values[at, touched[col]].astype(np.float32)
    out_p[slot, col] = prompts[at]
    out_r[slot, col] = rows[at]
    return Candidates(touched.astype(np.int64), out_v, out_p, out_r)


def merge(old: ChannelTops, new: Candidates, in_order: bool) -> ChannelTops:
    """Merge candidates into the tops of the same channels (``old`` holds only those columns).

    ``in_order``: every new (prompt, row) comes after every kept one (the usual case); otherwise
    each column is put in (prompt, row) order first."""
    depth, width = old.values.shape
    v = np.concatenate([old.values, new.values])
    p = np.concatenate([old.prompts, new.prompts])
    r = np.concatenate([old.rows, new.rows])
    slot = np.arange(depth)[:, None] < old.counts[None, :]
    valid = np.concatenate([slot, ~np.isnan(new.values)])
    if not in_order:
        key = np.where(valid, p * (1 << 32) + r, np.iinfo(np.int64).max)
        order = np.argsort(key, axis=0, kind="stable")
        v, p, r, valid = (np.take_along_axis(a, order, axis=0) for a in (v, p, r, valid))
    rank = np.where(valid, value_rank(v), _NO_VALUE)
    m = rank.shape[0]
    if m > depth:
        kth = np.partition(rank, m - depth, axis=0)[m - depth]
        above = rank > kth
        tied = rank == kth
        keep = above | (tied & (np.cumsum(tied, axis=0) <= depth - above.sum(0)))
        keep &= valid
    else:
        keep = valid
    counts = keep.sum(0).astype(np.int64)
    out = ChannelTops.empty(depth, width)
    at, col = np.nonzero(keep)  # row-major: each column's kept entries stay in (prompt, row) order
    slot_of = (np.cumsum(keep, axis=0) - 1)[at, col]
    out.values[slot_of, col] = v[at, col]
    out.prompts[slot_of, col] = p[at, col]
    out.rows[slot_of, col] = r[at, col]
    return ChannelTops(out.values, out.prompts, out.rows, counts)


def merge_block(tops: ChannelTops, values: np.ndarray, prompts: np.ndarray, rows: np.ndarray,
                in_order: bool) -> ChannelTops:
    """``tops`` (every channel) with a ``[n, channels]`` block merged in (see :func:`candidates`)."""
    new = candidates(values, prompts, rows, tops.floor(), tops.values.shape[0], in_order)
    if not new.channels.size:
        return tops
    c = new.channels
    merged = merge(ChannelTops(tops.values[:, c], tops.prompts[:, c], tops.rows[:, c], tops.counts[c]), new, in_order)
    out = ChannelTops(tops.values.copy(), tops.prompts.copy(), tops.rows.copy(), tops.counts.copy())
    out.values[:, c], out.prompts[:, c], out.rows[:, c], out.counts[c] = merged
    return out


def ranked(values: np.ndarray, prompts: np.ndarray, rows: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """The order of entries best first: value descending, then prompt, row, channel ascending."""
    return np.lexsort((channels, rows, prompts, -value_rank(values)))


class SearchIndex(TokenIndex):
    """The part of :class:`~interlatent.db.store.LatentDB` that keeps and reads the search index."""

    _index_pending: list[tuple[int, int, int, np.ndarray]]  # (layer_id, width, prompt_index, block)

    def _index_block(self, layer_id: int, width: int, prompt_index: int, block: np.ndarray) -> None:
        """Note a dense block just written (float32 as stored); merged at the commit."""
        self._index_pending.append((layer_id, width, int(prompt_index), block))

    def _before_commit(self, conn: sqlite3.Connection) -> None:
        pending, self._index_pending[:] = list(self._index_pending), []
        by_layer: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        for layer_id, width, pidx, block in pending:
            by_layer.setdefault(layer_id, []).append((width, pidx, block))
        for layer_id, items in by_layer.items():
            self._merge_into_layer(conn, layer_id, items)
        super()._before_commit(conn)

    def _merge_into_layer(self, conn: sqlite3.Connection, layer_id: int, items: list[tuple[int, int, np.ndarray]]
                          ) -> None:
        """Log what of the blocks can enter the layer's tops (one small row), folding the log into
        the channel rows once it holds ``depth * width / 2`` entries."""
        width = items[0][0]
        meta = conn.execute("SELECT depth, n_sequences, max_prompt, floor, n_logged FROM search_index_layers"
                            " WHERE layer_id=?", (layer_id,)).fetchone()
        if meta is None:
            stored = conn.execute("SELECT COUNT(*) FROM activations WHERE layer_id=?", (layer_id,)).fetchone()[0]
            if stored != len(items):  # rows written before the index existed: built on first query
                return
            meta = (DEFAULT_DEPTH, 0, -1, np.full(width, -np.inf, np.float32).tobytes(), 0)
        depth, n_seq, max_prompt, floor_blob, n_logged = meta
        items.sort(key=lambda it: it[1])
        values = np.concatenate([b for _, _, b in items])
        prompts = np.concatenate([np.full(b.shape[0], p, np.int64) for _, p, b in items])
        rows = np.concatenate([np.arange(b.shape[0], dtype=np.int64) for _, _, b in items])
        floor = np.frombuffer(floor_blob, dtype="<f4").copy()  # as of the last fold: at most the true floor
        fresh = _logged(candidates(values, prompts, rows, floor, depth, in_order=items[0][1] > max_prompt))
        if fresh.size and n_logged + fresh.size > depth * width // 2:
            logged = [np.frombuffer(d, dtype=LOGGED) for d, in conn.execute(
                "SELECT data FROM search_index_log WHERE layer_id=?", (layer_id,))]
            floor = self._fold(conn, layer_id, depth, floor, np.concatenate([*logged, fresh]))
            conn.execute("DELETE FROM search_index_log WHERE layer_id=?", (layer_id,))
            n_logged = 0
        elif fresh.size:
            conn.execute("INSERT INTO search_index_log(layer_id, data) VALUES (?, ?)", (layer_id, fresh.tobytes()))
            n_logged += fresh.size
        conn.execute("INSERT OR REPLACE INTO search_index_layers(layer_id, depth, n_sequences, max_prompt, floor,"
                     " n_logged) VALUES (?, ?, ?, ?, ?, ?)",
                     (layer_id, depth, n_seq + len(items), max(max_prompt, items[-1][1]),
                      floor.astype("<f4").tobytes(), n_logged))

    def _fold(self, conn: sqlite3.Connection, layer_id: int, depth: int, floor: np.ndarray,
              entries: np.ndarray) -> np.ndarray:
        """Merge logged entries into their channel rows; returns the new floors."""
        e = entries[np.lexsort((entries["row"], entries["prompt"], entries["channel"]))]
        ch = e["channel"].astype(np.int64)
        touched, start = np.unique(ch, return_index=True)
        col = np.searchsorted(touched, ch)
        slot = np.arange(ch.size) - start[col]
        n_slots = int(slot.max()) + 1
        cand = Candidates(touched, np.full((n_slots, touched.size), np.nan, np.float32),
                          np.zeros((n_slots, touched.size), np.int64), np.zeros((n_slots, touched.size), np.int64))
        cand.values[slot, col], cand.prompts[slot, col], cand.rows[slot, col] = e["value"], e["prompt"], e["row"]
        new = merge(self._load_channels(conn, layer_id, depth, touched), cand, in_order=False)
        floor[touched] = new.floor()
        conn.executemany("INSERT OR REPLACE INTO search_index(layer_id, channel, data) VALUES (?, ?, ?)",
                         [(layer_id, int(c), _pack(new, j)) for j, c in enumerate(touched.tolist())])
        return floor

    def _load_channels(self, conn: sqlite3.Connection, layer_id: int, depth: int, channels: np.ndarray) -> ChannelTops:
        out = ChannelTops.empty(depth, channels.size)
        col = {int(c): j for j, c in enumerate(channels.tolist())}
        for chunk, in_channels in in_chunks(list(col)):
            for ch, data in conn.execute(f"SELECT channel, data FROM search_index WHERE layer_id=? AND channel IN"
                                         f" ({in_channels})", [layer_id, *chunk]):
                _unpack(out, col[ch], data)
        return out

    # ------------------------------------------------------------------ building and reading
    def build_index(self, layer: str | None = None, depth: int | None = None, chunk_tokens: int = 16_384
                    ) -> list[str]:
        """(Re)build the search index of ``layer`` (or of every dense layer) with one scan of its
        stored activations, in one transaction; ``depth`` entries per channel (default
        :data:`DEFAULT_DEPTH`); returns the layers built. Writes keep it current
        afterwards; stores written before the index call this once (queries do it themselves on a
        writable store)."""
        self._require_writable()
        depth = DEFAULT_DEPTH if depth is None else int(depth)
        names = [self.resolve_layer(layer)] if layer is not None else self.layers()
        done = []
        for name in names:
            info = self.layer_info(name)
            if info.storage != "dense":
                continue
            with self.atomic() as conn:  # the write lock: no rows arrive between the scan and the index
                rows = self._layer_rows(info)
                tops = self._scan_tops(info, depth, chunk_tokens)
                self._drop_index(conn, info.layer_id)
                conn.executemany("INSERT INTO search_index(layer_id, channel, data) VALUES (?, ?, ?)",
                                 [(info.layer_id, c, _pack(tops, c)) for c in range(info.width) if tops.counts[c]])
                conn.execute("INSERT INTO search_index_layers(layer_id, depth, n_sequences, max_prompt, floor,"
                             " n_logged) VALUES (?, ?, ?, ?, ?, 0)",
                             (info.layer_id, depth, len(rows), max((r.prompt_index for r in rows), default=-1),
                              tops.floor().astype("<f4").tobytes()))
            log.info("search index of %s: %d sequences, depth %d", name, len(rows), depth)
            done.append(name)
        return done

    def _scan_tops(self, info: LayerInfo, depth: int, chunk_tokens: int = 16_384) -> ChannelTops:
        """Each channel's best ``depth`` entries by one pass over the layer's stored blocks."""
        index_of = {r.seq_id: r.prompt_index for r in self._layer_rows(info)}
        tops = ChannelTops.empty(depth, info.width)
        chunk: list[tuple[int, np.ndarray]] = []
        size = 0
        for sid, block in self._iter_layer_rows(info, None, None):  # in prompt order
            chunk.append((index_of[sid], block))
            size += block.shape[0]
            if size >= chunk_tokens:
                tops, chunk, size = _merge_chunk(tops, chunk), [], 0
        return _merge_chunk(tops, chunk) if chunk else tops

    def _drop_index(self, conn: sqlite3.Connection, layer_id: int) -> None:
        conn.execute("DELETE FROM search_index WHERE layer_id=?", (layer_id,))
        conn.execute("DELETE FROM search_index_log WHERE layer_id=?", (layer_id,))
        conn.execute("DELETE FROM search_index_layers WHERE layer_id=?", (layer_id,))

    def index_depth(self, layer: str) -> int | None:
        """The entries per channel the search index holds for ``layer`` when it is current, else None
        (no index yet, a sparse layer, or rows written past it)."""
        info = self.layer_info(layer)
        meta = self._conn.execute("SELECT depth, n_sequences FROM search_index_layers WHERE layer_id=?",
                                  (info.layer_id,)).fetchone()
        if meta is None:
            return None
        stored = self._conn.execute("SELECT COUNT(*) FROM activations WHERE layer_id=?", (info.layer_id,)).fetchone()
        return int(meta[0]) if stored[0] == meta[1] else None

    def _answerable_depth(self, info: LayerInfo) -> int | None:
        """The depth of a current index of ``info`` (built first on a writable store), else None."""
        if info.storage != "dense":
            return None
        depth = self.index_depth(info.name)
        if depth is None and self.mode == "rw":
            self.build_index(info.name)
            depth = self.index_depth(info.name)
        if depth is None:
            log.info("no current search index for %s (read-only store): scanning; db.build_index(%r) stores one",
                     info.name, info.name)
        return depth

    def _index_entries(self, info: LayerInfo, channels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Every kept entry of the layer (of ``channels``), with the channel of each."""
        parts, chans = [], []
        wanted = None if channels is None else set(np.asarray(channels).tolist())
        for ch, data in self._q("SELECT channel, data FROM search_index WHERE layer_id=?", (info.layer_id,)):
            if wanted is None or ch in wanted:
                entries = np.frombuffer(data, dtype=ENTRY)
                parts.append(entries)
                chans.append(np.full(entries.size, ch, np.int64))
        for data, in self._q("SELECT data FROM search_index_log WHERE layer_id=?", (info.layer_id,)):
            logged = np.frombuffer(data, dtype=LOGGED)
            if wanted is not None:
                logged = logged[np.isin(logged["channel"], np.asarray(list(wanted), dtype=np.int64))]
            entries = np.zeros(logged.size, dtype=ENTRY)
            entries["value"], entries["prompt"], entries["row"] = logged["value"], logged["prompt"], logged["row"]
            parts.append(entries)
            chans.append(logged["channel"].astype(np.int64))
        if not parts:
            return np.zeros(0, dtype=ENTRY), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(chans)

    def index_top(self, layer: str, top: int, channels: np.ndarray | None = None,
                  prompts: Sequence[int] | None = None, token_like: str | None = None) -> np.ndarray | None:
        """The ``top`` best entries of ``layer`` (of ``channels``; of the prompt indices ``prompts``
        and of the positions whose token contains ``token_like``, case-insensitively, when given)
        from the search index, best first, as a record array (value, prompt, row, channel); None
        where the index cannot answer: a sparse layer, ``top`` beyond its depth, no current index on
        a read-only store (a writable store builds it first), or filters the index cannot prove it
        answers exactly (see :func:`filtered_top`)."""
        info = self.layer_info(layer)
        depth = self._answerable_depth(info)
        if depth is None or top > depth:
            return None
        e, ch = self._index_entries(info, channels)
        passing = None
        if prompts is not None:
            passing = np.isin(e["prompt"], np.asarray(list(prompts), dtype=np.int64))
        if token_like is not None:
            where = np.flatnonzero(passing) if passing is not None else np.arange(e.size)
            hits = self.token_matches(e["prompt"][where], e["row"][where], token_like)
            if hits is None:
                return None
            passing = np.zeros(e.size, dtype=bool)
            passing[where[hits]] = True
        order = filtered_top(e, ch, depth, top, passing)
        if order is None:
            return None
        out = np.zeros(order.size, dtype=[("value", "<f4"), ("prompt", "<i8"), ("row", "<i8"), ("channel", "<i8")])
        out["value"], out["prompt"], out["row"], out["channel"] = e["value"][order], e["prompt"][order], \
            e["row"][order], ch[order]
        return out

    def index_examples(self, layer: str, top: int, *, scan: bool = False
                       ) -> list[tuple[int, int, int, int, float]] | None:
        """Each channel's ``top`` best entries from the search index, as the rows of
        :meth:`~interlatent.db.summaries.Summaries.latent_example_rows`: ``(channel, rank,
        prompt_index, position, value)``, by channel then rank. Where the index cannot answer (see
        :meth:`index_top`): None, or with ``scan`` the same rows from one pass over the layer."""
        info = self.layer_info(layer)
        depth = self._answerable_depth(info)
        if depth is not None and top <= depth:
            e, ch = self._index_entries(info, None)
        elif scan:
            tops = self._scan_tops(info, top)
            filled = np.arange(top)[:, None] < tops.counts[None, :]
            at, col = np.nonzero(filled.T)
            e = np.zeros(at.size, dtype=ENTRY)
            e["value"], e["prompt"], e["row"] = tops.values[col, at], tops.prompts[col, at], tops.rows[col, at]
            ch = at.astype(np.int64)
        else:
            return None
        order = np.lexsort((e["row"], e["prompt"], -value_rank(e["value"]), ch))  # by channel, then rank
        e, ch = e[order], ch[order]
        rank = np.arange(ch.size) - np.searchsorted(ch, ch)
        keep = rank < top
        e, ch, rank = e[keep], ch[keep], rank[keep]
        positions = {p: pos for p, (pos, _, _) in self.token_lists(np.unique(e["prompt"]).tolist()).items()}
        return [(c, r, p, int(positions[p][row]), v) for c, r, p, row, v in
                zip(ch.tolist(), rank.tolist(), e["prompt"].tolist(), e["row"].tolist(), e["value"].tolist())]


def filtered_top(entries: np.ndarray, channels: np.ndarray, depth: int, top: int,
                 passing: np.ndarray | None) -> np.ndarray | None:
    """The positions in ``entries`` (every kept entry of a layer, ``channels`` the channel of each) of
    the ``top`` best that pass a filter (``passing``; None: all pass), best first; None where they
    may not be the ``top`` best passing entries of the whole layer.

    A channel holding ``depth`` or more entries keeps every one of its stored values that ranks
    before its ``depth``-th best entry ``m`` (any value it did not keep ranks after ``m``). Such a
    channel cannot hide a passing value from the answer when ``top`` of its best ``depth`` pass (a
    hidden one ranks after those), or when ``m`` ranks at or after ``V``, the ``top``-th best
    passing entry found (a hidden one ranks after ``V``). Channels with fewer entries hold all
    their values."""
    n = entries.size
    order = ranked(entries["value"], entries["prompt"], entries["row"].astype(np.int64), channels)
    if passing is None:
        return order[:top]
    place = np.empty(n, dtype=np.int64)
    place[order] = np.arange(n)  # the rank of each entry among all
    by_channel = np.lexsort((place, channels))
    ch = channels[by_channel]
    within = np.arange(n) - np.searchsorted(ch, ch)  # rank within its channel
    head = within < depth
    full = np.unique(ch[within == depth - 1])  # channels holding depth entries or more
    best = order[passing[order]][:top]
    if not full.size:
        return best
    passing_head = np.bincount(ch[head & passing[by_channel]], minlength=int(ch.max()) + 1)
    floor_place = np.zeros(int(ch.max()) + 1, dtype=np.int64)
    floor_place[ch[within == depth - 1]] = place[by_channel][within == depth - 1]
    safe = passing_head[full] >= top
    if best.size == top:
        safe |= floor_place[full] >= place[best[-1]]
    return best if bool(safe.all()) else None


def _merge_chunk(tops: ChannelTops, chunk: list[tuple[int, np.ndarray]]) -> ChannelTops:
    values = np.concatenate([b for _, b in chunk])
    prompts = np.concatenate([np.full(b.shape[0], p, np.int64) for p, b in chunk])
    rows = np.concatenate([np.arange(b.shape[0], dtype=np.int64) for _, b in chunk])
    return merge_block(tops, values, prompts, rows, in_order=True)


def _logged(cand: Candidates) -> np.ndarray:
    """The filled slots of candidates as LOGGED records."""
    slot, col = np.nonzero(~np.isnan(cand.values))
    out = np.zeros(slot.size, dtype=LOGGED)
    out["value"], out["prompt"], out["row"] = cand.values[slot, col], cand.prompts[slot, col], cand.rows[slot, col]
    out["channel"] = cand.channels[col]
    return out


def _unpack(out: ChannelTops, j: int, data: bytes) -> None:
    """A channel's BLOB of ENTRY records into column ``j`` of ``out``."""
    entries = np.frombuffer(data, dtype=ENTRY)
    n = entries.size
    out.values[:n, j], out.prompts[:n, j], out.rows[:n, j] = entries["value"], entries["prompt"], entries["row"]
    out.counts[j] = n


def _pack(tops: ChannelTops, j: int) -> bytes:
    """Column ``j`` of ``tops`` as a BLOB of ENTRY records."""
    n = int(tops.counts[j])
    entries = np.zeros(n, dtype=ENTRY)
    entries["value"], entries["prompt"], entries["row"] = tops.values[:n, j], tops.prompts[:n, j], tops.rows[:n, j]
    return entries.tobytes()
