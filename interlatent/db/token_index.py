"""The token index: which positions hold a token whose text contains a search string, found without a
pass over every sequence's token list.

Tables (migration 7 of :mod:`interlatent.db.schema`):

=====================  ==========================================================================
token_vocab            each distinct token text once, with its ``vocab_id`` (a missing text is ``''``)
token_vocab_ids        per sequence the ``vocab_id`` of each position, int32 ``[positions]``: exact
token_postings         per vocab id the sequences holding it (seq ids, int64 ascending), one row per
                       fold of the log (``part``)
token_postings_log     ``(vocab_id int32, seq_id int64)`` pairs written since the last fold, one row
                       per write; folded into ``token_postings`` once it holds :data:`FOLD_PAIRS`
token_index_pending    sequences whose ``tokens`` row was inserted or changed and not yet indexed
=====================  ==========================================================================

Triggers on ``tokens`` fill ``token_index_pending`` and drop a deleted sequence's
``token_vocab_ids`` row, so the index notices rows written by code that bypassed the writer, and
deletes of any kind. The writer hands the token texts it wrote (:meth:`TokenIndex._note_tokens`);
at the commit of the outermost transaction every pending sequence is indexed, inside that
transaction, and the vocabulary ids it added join this connection's cache only once it commits.
The migration indexes the sequences of an existing store the same way.

Postings only grow: a sequence deleted or rewritten may still be listed under a token it no longer
holds. Readers take the postings as candidates and confirm each against ``token_vocab_ids``, which
is exact; the answer is exact. A substring search runs over the vocabulary (a few thousand texts),
not over every token. While sequences wait in ``token_index_pending`` (a store written by another
library, opened read-only) the index is not current and readers return None: the caller scans.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from interlatent.db.columns import in_chunks, token_like_pattern, token_text
from interlatent.db.reader import Reader

log = logging.getLogger(__name__)

FOLD_PAIRS = 262_144  # (vocab, sequence) pairs the log holds before it is folded into postings
PAIR = np.dtype([("vocab", "<i4"), ("seq", "<i8")])
_CHUNK_SEQUENCES = 4096  # sequences indexed at a time when the pending rows were not noted in memory


def vocab_ids_of(conn: sqlite3.Connection, tokens: list[Any], cache: dict[Any, int], added: dict[Any, int]
                 ) -> np.ndarray:
    """The vocab id of each token, int32; texts new to the store are inserted. ``cache`` (token ->
    id: committed entries, keyed by the token as given, so ``None`` too) is only read; what this
    transaction found or added goes to ``added``."""
    ids = list(map(cache.get, tokens))
    if None in ids:
        missing = {t for t, i in zip(tokens, ids) if i is None}
        new = {t: token_text(t) for t in missing if t not in added}
        texts = sorted(set(new.values()))
        if texts:
            conn.executemany("INSERT OR IGNORE INTO token_vocab(text) VALUES (?)", [(t,) for t in texts])
            found: dict[str, int] = {}
            for chunk, in_texts in in_chunks(texts):
                found.update((text, int(vid)) for vid, text in conn.execute(
                    f"SELECT vocab_id, text FROM token_vocab WHERE text IN ({in_texts})", chunk))
            added.update((t, found[text]) for t, text in new.items())
        ids = [added[t] if i is None else i for t, i in zip(tokens, ids)]
    return np.array(ids, dtype=np.int32)


def index_sequences(conn: sqlite3.Connection, items: Sequence[tuple[int, Sequence[Any]]], cache: dict[Any, int],
                    added: dict[Any, int]) -> None:
    """Index ``(seq_id, token texts)`` pairs: their per-position vocab ids and one log row of
    postings, folding the log when it is full. Runs inside the caller's transaction."""
    if not items:
        return
    lengths = [len(toks) for _, toks in items]
    ids = vocab_ids_of(conn, list(itertools.chain.from_iterable(toks for _, toks in items)), cache, added)
    parts = np.split(ids, np.cumsum(lengths)[:-1])
    conn.executemany("INSERT OR REPLACE INTO token_vocab_ids(seq_id, data) VALUES (?, ?)",
                     [(int(sid), part.astype("<i4").tobytes()) for (sid, _), part in zip(items, parts)])
    which = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
    key = np.sort((which << 32) | ids.astype(np.int64))
    key = key[np.r_[True, key[1:] != key[:-1]]] if key.size else key  # each (sequence, vocab id) once
    pairs = np.zeros(key.size, dtype=PAIR)
    pairs["vocab"] = key & 0xFFFFFFFF
    pairs["seq"] = np.array([sid for sid, _ in items], dtype=np.int64)[key >> 32]
    if pairs.size:
        conn.execute("INSERT INTO token_postings_log(data) VALUES (?)", (pairs.tobytes(),))
    logged = conn.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM token_postings_log").fetchone()[0]
    if logged // PAIR.itemsize >= FOLD_PAIRS:
        fold_postings(conn)


def fold_postings(conn: sqlite3.Connection) -> None:
    """Move the log's pairs into one new postings row per vocab id they name."""
    rows = conn.execute("SELECT log_id, data FROM token_postings_log").fetchall()
    if not rows:
        return
    part = max(int(log_id) for log_id, _ in rows)
    pairs = np.concatenate([np.frombuffer(data, dtype=PAIR) for _, data in rows])
    pairs = pairs[np.lexsort((pairs["seq"], pairs["vocab"]))]
    pairs = pairs[np.r_[True, (pairs["vocab"][1:] != pairs["vocab"][:-1]) | (pairs["seq"][1:] != pairs["seq"][:-1])]]
    vocab = pairs["vocab"].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, vocab[1:] != vocab[:-1]])
    ends = np.r_[starts[1:], vocab.size]
    conn.executemany("INSERT INTO token_postings(vocab_id, part, data) VALUES (?, ?, ?)",
                     [(int(vocab[s]), part, pairs["seq"][s:e].astype("<i8").tobytes())
                      for s, e in zip(starts.tolist(), ends.tolist())])
    conn.execute("DELETE FROM token_postings_log")


def index_pending(conn: sqlite3.Connection, cache: dict[Any, int], added: dict[Any, int],
                  noted: dict[int, Sequence[Any]] | None = None) -> int:
    """Index every sequence in ``token_index_pending`` (the texts of ``noted`` ones from memory, the
    others read from ``tokens``), then empty it. Returns the sequences indexed."""
    pending = [int(r[0]) for r in conn.execute("SELECT seq_id FROM token_index_pending ORDER BY seq_id")]
    if not pending:
        return 0
    noted = noted or {}
    known = [(s, noted[s]) for s in pending if s in noted]
    index_sequences(conn, known, cache, added)
    unread = [s for s in pending if s not in noted]
    for start in range(0, len(unread), _CHUNK_SEQUENCES):
        items = []
        for chunk, in_ids in in_chunks(unread[start : start + _CHUNK_SEQUENCES]):
            items += [(int(sid), json.loads(text)) for sid, text in conn.execute(
                f"SELECT seq_id, tokens FROM tokens WHERE seq_id IN ({in_ids})", chunk)]
        index_sequences(conn, items, cache, added)
    conn.execute("DELETE FROM token_index_pending")
    if unread:
        log.info("token index: %d sequences indexed from their stored tokens", len(unread))
    return len(pending)


def backfill(conn: sqlite3.Connection) -> None:
    """The migration's step: index every stored sequence (the migration marked them pending)."""
    index_pending(conn, {}, {})


class TokenIndex(Reader):
    """The part of :class:`~interlatent.db.store.LatentDB` that keeps and reads the token index."""

    _token_pending: list[tuple[int, Sequence[Any]]]  # (seq_id, token texts) written, not yet committed
    _vocab_cache: dict[Any, int]  # token -> vocab id: committed entries seen by this connection

    def _note_tokens(self, seq_id: int, tokens: Sequence[Any]) -> None:
        self._token_pending.append((int(seq_id), tokens))

    def _before_commit(self, conn: sqlite3.Connection) -> None:
        noted, self._token_pending[:] = dict(self._token_pending), []
        added: dict[Any, int] = {}
        index_pending(conn, self._vocab_cache, added, noted)
        if added:
            self.after_commit(lambda: self._vocab_cache.update(added))
        super()._before_commit(conn)

    def token_index_current(self) -> bool:
        """Whether the token index covers every stored sequence; on a writable store it is brought up
        to date first (sequences written by code that bypassed the writer)."""
        if not self._q("SELECT 1 FROM token_index_pending LIMIT 1"):
            return True
        if self.mode != "rw":
            log.info("%s: token index not current (read-only store): token filters read the token lists", self.path)
            return False
        with self.atomic():
            pass  # the commit indexes what is pending
        return True

    def matching_vocab(self, token_like: str) -> np.ndarray:
        """Vocab ids whose text contains ``token_like``, case-insensitively (Python's ``str.lower``,
        as the scan compares), int64 ascending."""
        needle = token_like.lower()
        sql, params = "SELECT vocab_id, text FROM token_vocab", []
        pattern = token_like_pattern(token_like)
        if pattern is not None:
            sql += " WHERE text LIKE ? ESCAPE '\\'"
            params.append(pattern)
        ids = [vid for vid, text in self._q(sql, params) if needle in text.lower()]
        return np.array(sorted(ids), dtype=np.int64)

    def _vocab_rows(self, prompt_indices: Sequence[int]) -> dict[int, np.ndarray]:
        """``prompt_index -> vocab id per position`` of the given prompts (those indexed)."""
        out = {}
        for chunk, marks_ in in_chunks(sorted({int(p) for p in prompt_indices})):
            for pidx, data in self._q("SELECT s.prompt_index, v.data FROM sequences s JOIN token_vocab_ids v"
                                      f" ON v.seq_id = s.seq_id WHERE s.prompt_index IN ({marks_})", chunk):
                out[int(pidx)] = np.frombuffer(data, dtype="<i4")
        return out

    def _candidates(self, wanted: np.ndarray, limit: int | None = None) -> np.ndarray | None:
        """The seq ids (ascending, once each) the postings list under the vocab ids ``wanted`` (a
        superset of the sequences holding them); None, unread, where the postings name more than
        ``limit`` entries."""
        if limit is not None:
            size = sum(self._q(f"SELECT COALESCE(SUM(LENGTH(data)), 0) FROM token_postings WHERE vocab_id IN ({m})",
                               chunk)[0][0] for chunk, m in in_chunks(wanted.tolist()))
            if size // 8 > limit:
                return None
        seqs = [np.frombuffer(d, dtype="<i8") for chunk, m in in_chunks(wanted.tolist())
                for d, in self._q(f"SELECT data FROM token_postings WHERE vocab_id IN ({m})", chunk)]
        lookup = _lookup(wanted)
        for data, in self._q("SELECT data FROM token_postings_log"):
            pairs = np.frombuffer(data, dtype=PAIR)
            seqs.append(pairs["seq"][lookup(pairs["vocab"])])
        found = np.sort(np.concatenate(seqs)) if seqs else np.zeros(0, np.int64)
        return found[np.r_[True, found[1:] != found[:-1]]] if found.size else found

    def token_matches(self, prompts: np.ndarray, rows: np.ndarray, token_like: str) -> np.ndarray | None:
        """True where the token at ``(prompts[i], rows[i])`` contains ``token_like``
        (case-insensitively); None where the token index is not current. Reads the vocab ids of
        the prompts given, or of only those the postings name where they are fewer."""
        if not self.token_index_current():
            return None
        wanted = self.matching_vocab(token_like)
        out = np.zeros(len(prompts), dtype=bool)
        if not wanted.size or not len(prompts):
            return out
        uniq, at = np.unique(np.asarray(prompts, dtype=np.int64), return_inverse=True)
        candidates = self._candidates(wanted, limit=uniq.size)
        if candidates is not None:
            named = self._prompts_of(candidates)
            keep = np.isin(uniq[at], named)
            sub = self.token_matches_in(uniq[at][keep], np.asarray(rows)[keep], wanted)
            out[keep] = sub
            return out
        return self.token_matches_in(np.asarray(prompts), np.asarray(rows), wanted)

    def token_matches_in(self, prompts: np.ndarray, rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """True where the vocab id at ``(prompts[i], rows[i])`` is one of ``wanted``."""
        out = np.zeros(len(prompts), dtype=bool)
        if not len(prompts):
            return out
        uniq, at = np.unique(np.asarray(prompts, dtype=np.int64), return_inverse=True)
        stored = self._vocab_rows(uniq.tolist())
        arrays = [stored.get(int(p), np.zeros(0, np.int32)) for p in uniq]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        flat = np.concatenate(arrays)
        rows = np.asarray(rows, dtype=np.int64)
        inside = rows < lengths[at]
        out[inside] = _lookup(wanted)(flat[offsets[at[inside]] + rows[inside]])
        return out

    def _prompts_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """The prompt indices of the stored sequences among ``seq_ids``, ascending."""
        found = [r[0] for chunk, m in in_chunks(seq_ids.tolist())
                 for r in self._q(f"SELECT prompt_index FROM sequences WHERE seq_id IN ({m})", chunk)]
        return np.sort(np.array(found, dtype=np.int64))

    def token_positions(self, token_like: str, prompt_indices: Sequence[int] | None = None
                        ) -> dict[int, np.ndarray] | None:
        """``prompt_index -> rows`` (int64 ascending) of every position whose token contains
        ``token_like``, case-insensitively, among ``prompt_indices`` (all when None): the
        sequences are found from the postings, not by reading every token list. None where the
        token index is not current (the caller reads the token lists)."""
        hits = self._indexed_token_rows(token_like)
        if hits is None:
            return None
        allowed = None if prompt_indices is None else {int(p) for p in prompt_indices}
        out = {}
        for chunk, m in in_chunks(list(hits)):
            for sid, pidx in self._q(f"SELECT seq_id, prompt_index FROM sequences WHERE seq_id IN ({m})", chunk):
                if allowed is None or pidx in allowed:
                    out[int(pidx)] = hits[int(sid)]
        return dict(sorted(out.items()))

    def _indexed_token_rows(self, token_like: str, seq_ids: Sequence[int] | None = None
                            ) -> dict[int, np.ndarray] | None:
        """``seq_id -> rows`` (int64 ascending) of every position whose token contains ``token_like``,
        case-insensitively, among ``seq_ids`` (all when None): only the sequences the postings name
        are read. None where the token index is not current (the caller reads the token lists)."""
        if not self.token_index_current():
            return None
        wanted = self.matching_vocab(token_like)
        if not wanted.size or (seq_ids is not None and not len(seq_ids)):
            return {}
        candidates = self._candidates(wanted)
        if seq_ids is not None:
            candidates = np.intersect1d(candidates, np.asarray(seq_ids, dtype=np.int64))
        lookup = _lookup(wanted)
        out = {}
        for chunk, m in in_chunks(candidates.tolist()):
            for sid, data in self._q(f"SELECT seq_id, data FROM token_vocab_ids WHERE seq_id IN ({m})", chunk):
                hits = np.flatnonzero(lookup(np.frombuffer(data, dtype="<i4")))
                if hits.size:
                    out[int(sid)] = hits.astype(np.int64)
        return out


def _lookup(wanted: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function: vocab ids (an int array) -> True where the id is one of ``wanted``."""
    table = np.zeros(int(wanted.max()) + 2 if wanted.size else 1, dtype=bool)
    table[wanted] = True  # the last slot stays False: every id beyond the table maps there

    def member(ids: np.ndarray) -> np.ndarray:
        return table[np.minimum(ids, table.size - 1)]

    return member
