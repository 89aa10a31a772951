"""Writing: sequences with their tokens, metrics and activations, one transaction per batch.

A sequence (a prompt or an episode) is one ``sequences`` row, one ``tokens`` row holding all its
positions, one ``token_metrics`` row per metric, and per layer one ``activations`` row holding its
``[positions, channels]`` matrix (dense, or the TopK indices and values of a sparse layer) as BLOBs
(:mod:`interlatent.db.codec`). ``duplicates="attach"`` finds a stored sequence by its text and token
ids inside the write's own transaction, so concurrent writers agree on it. In a parquet-tier store a
record's block may already be in a shard file another process wrote
(:class:`~interlatent.db.records.WrittenBlock`): the write then commits only its catalog rows.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from interlatent.db import codec
from interlatent.db.catalog import Catalog
from interlatent.db.columns import dumps, in_chunks
from interlatent.db.records import SequenceRecord, SparseActs, WrittenBlock
from interlatent.db.shards import ShardBlock
from interlatent.db.tier import Tiers
from interlatent.db.search_index import SearchIndex
from interlatent.errors import ConfigError, LayerExistsError, ShapeError, ShardError

log = logging.getLogger(__name__)


class Writer(SearchIndex, Tiers, Catalog):
    """The part of :class:`~interlatent.db.store.LatentDB` that writes sequences and activations."""

    float16_overflow: str

    def write(
        self,
        run_id: int,
        records: Sequence[SequenceRecord],
        *,
        dtypes: dict[str, str] | None = None,
        layer_meta: dict[str, dict[str, Any]] | None = None,
        duplicates: str = "new",
        counts: dict[str, int] | None = None,
    ) -> list[int]:
        """Write a batch of sequences with their tokens, metrics and activations, in one transaction.

        Args:
            run_id: the run the batch belongs to (see :meth:`run`).
            records: one :class:`SequenceRecord` per prompt or episode.
            dtypes: storage dtype per layer (``float16`` default; ``float32``, ``bfloat16``), used
                when the layer is first written.
            layer_meta: per-layer extras recorded when the layer is first written (``hook_name``,
                ``kind``, ``source``, ``n_blocks`` ...).

            duplicates: ``"new"`` (default): a record without ``prompt_index`` is a new sequence.
                ``"attach"``: a record without ``prompt_index`` whose text and token ids are already
                stored joins that sequence (its stored label, context and metrics are kept; metrics
                it lacks are added), and layers a sequence already holds are skipped, not refused.
                The lookup happens inside this write's transaction, so concurrent writers agree.
            counts: if given, incremented with ``new`` (sequences created), ``attached`` (records
                that joined a stored sequence), ``layers_skipped`` (layers already stored) and
                ``retokenised`` (new sequences whose text is stored with other token ids).

        A record whose ``prompt_index`` is already stored with the same text and length adds its
        layers to that sequence (collecting more layers over the same prompts); a different text at
        that index raises :class:`ConfigError`. A record without one takes its ``index_hint`` when
        that index is free, else the next free index. Either the whole batch is stored or nothing is.

        In a parquet-tier store, a record's activations may be :class:`WrittenBlock` values that another
        process wrote with :meth:`shard_writer`'s writer: their catalog rows are committed as if this
        write had written the blocks (a staged file moves into its layer's folder), and a file none of
        whose blocks is used (all already stored) is deleted after the commit.
        """
        if duplicates not in ("new", "attach"):
            raise ConfigError(f"duplicates must be 'new' or 'attach', got {duplicates!r}")
        dtypes = dtypes or {}
        layer_meta = layer_meta or {}
        counts = counts if counts is not None else {}
        for key in ("new", "attached", "layers_skipped", "retokenised"):
            counts.setdefault(key, 0)
        for rec in records:
            rec.validate()
        attach = duplicates == "attach"
        written: list[int] = []
        self._pending_blocks, self._pending_written = [], []
        offered = {b.path for r in records for b in r.activations.values() if isinstance(b, WrittenBlock)}
        with self.atomic() as conn:
            next_index = conn.execute("SELECT COALESCE(MAX(prompt_index) + 1, 0) FROM sequences").fetchone()[0]
            label_names = [r.label for r in records if isinstance(r.label, str)]
            classes = self.register_label_classes(label_names) if label_names else {}
            stored = self._stored_by_text(conn, records) if attach else {}
            for rec in records:
                ids_blob = np.asarray(rec.token_ids, dtype="<i4").tobytes()
                found = stored.get((rec.kind, rec.text, ids_blob)) if rec.prompt_index is None else None
                if found is not None:
                    seq_id, rec_index = found
                    counts["attached"] += 1
                else:
                    if attach and rec.prompt_index is None and (rec.kind, rec.text) in stored:
                        counts["retokenised"] += 1
                    if rec.prompt_index is not None:
                        rec_index = int(rec.prompt_index)
                    elif rec.index_hint is not None and conn.execute(
                            "SELECT 1 FROM sequences WHERE prompt_index=?", (int(rec.index_hint),)).fetchone() is None:
                        rec_index = int(rec.index_hint)
                    else:
                        rec_index = next_index
                    next_index = max(next_index, rec_index + 1)
                    n_before = conn.total_changes
                    seq_id = self._write_sequence(conn, run_id, rec, rec_index, classes)
                    counts["new"] += int(conn.total_changes > n_before)
                    if attach and rec.text is not None:
                        stored.setdefault((rec.kind, rec.text, ids_blob), (seq_id, rec_index))
                        stored.setdefault((rec.kind, rec.text), (seq_id, rec_index))
                self._write_metrics(conn, seq_id, rec, keep_stored=found is not None)
                for layer, acts in rec.activations.items():
                    if attach and self._has_layer(conn, seq_id, layer):
                        counts["layers_skipped"] += 1
                        continue
                    self._write_activation(conn, run_id, seq_id, layer, acts, dtypes.get(layer),
                                           layer_meta.get(layer, {}), rec_index)
                written.append(rec_index)
            if offered:
                self._drop_unused(offered, {b.path for *_, b in self._pending_written})
            self._flush_blocks(conn)
        return written

    def _stored_by_text(self, conn: sqlite3.Connection, records: Sequence[SequenceRecord]
                        ) -> dict[tuple[Any, ...], tuple[int, int]]:
        """(kind, text, token-id bytes) and (kind, text) -> (seq_id, prompt_index) of the first stored
        sequence with these texts (and tokens)."""
        texts = sorted({r.text for r in records if r.text is not None and r.prompt_index is None})
        out: dict[tuple[str, str, bytes], tuple[int, int]] = {}
        for chunk, in_texts in in_chunks(texts):
            rows = conn.execute(
                "SELECT s.kind, s.text, t.token_ids, s.seq_id, s.prompt_index FROM sequences s JOIN tokens t"
                f" ON t.seq_id = s.seq_id WHERE s.text IN ({in_texts}) ORDER BY s.prompt_index", chunk).fetchall()
            for kind, text, blob, seq_id, index in rows:
                out.setdefault((kind, text, bytes(blob)), (int(seq_id), int(index)))
                out.setdefault((kind, text), (int(seq_id), int(index)))
        return out

    def _has_layer(self, conn: sqlite3.Connection, seq_id: int, layer: str) -> bool:
        return conn.execute("SELECT 1 FROM activations a JOIN layers l ON l.layer_id = a.layer_id"
                            " WHERE l.name=? AND a.seq_id=?", (layer, seq_id)).fetchone() is not None

    def _write_sequence(self, conn: sqlite3.Connection, run_id: int, rec: SequenceRecord, index: int,
                        classes: dict[str, int]) -> int:
        row = conn.execute("SELECT seq_id, text, n_positions FROM sequences WHERE prompt_index=?",
                           (index,)).fetchone()
        if row is not None:
            if row[1] != rec.text or row[2] != rec.n_positions:
                raise ConfigError(
                    f"prompt_index {index} already holds another sequence ({row[2]} positions, "
                    f"text {str(row[1])[:40]!r}); write new prompts with prompt_index=None (the next "
                    "free index) or into a new store"
                )
            return int(row[0])
        label_id = classes.get(rec.label) if isinstance(rec.label, str) else None
        cur = conn.execute(
            "INSERT INTO sequences(run_id, prompt_index, kind, text, label, label_id, context, n_positions)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, index, rec.kind, rec.text, None if rec.label is None else dumps(rec.label),
             label_id, dumps(rec.context or {}), rec.n_positions),
        )
        seq_id = int(cur.lastrowid)
        positions = None
        if rec.positions is not None:
            positions = np.asarray(rec.positions, dtype=np.int64)
            if np.any(np.diff(positions) <= 0):
                raise ShapeError(f"positions of prompt {index} must be strictly increasing")
            if np.array_equal(positions, np.arange(rec.n_positions)):
                positions = None
        generated = None
        if rec.generated is not None and np.any(rec.generated):
            generated = np.asarray(rec.generated, dtype=np.uint8).tobytes()
        conn.execute(
            "INSERT INTO tokens(seq_id, token_ids, tokens, positions, generated, context) VALUES (?, ?, ?, ?, ?, ?)",
            (seq_id, np.asarray(rec.token_ids, dtype="<i4").tobytes(), dumps(list(rec.tokens)),
             None if positions is None else positions.astype("<i4").tobytes(), generated,
             None if rec.token_context is None else dumps(rec.token_context)),
        )
        self._note_tokens(seq_id, rec.tokens)
        return seq_id

    def _metric_id(self, conn: sqlite3.Connection, name: str) -> int:
        if name not in self._metric_ids:
            conn.execute("INSERT OR IGNORE INTO metrics(name) VALUES (?)", (name,))
            self._metric_ids[name] = int(
                conn.execute("SELECT metric_id FROM metrics WHERE name=?", (name,)).fetchone()[0]
            )
        return self._metric_ids[name]

    def _write_metrics(self, conn: sqlite3.Connection, seq_id: int, rec: SequenceRecord,
                       keep_stored: bool = False) -> None:
        rows = []
        for name, values in rec.metrics.items():
            try:
                arr = np.asarray(values, dtype="<f4")
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"metric {name!r} must be numeric per position (got {type(values).__name__}); "
                    "put non-numeric values in the record's context instead"
                ) from exc
            rows.append((seq_id, self._metric_id(conn, name), arr.tobytes()))
        if rows:
            verb = "INSERT OR IGNORE" if keep_stored else "INSERT OR REPLACE"
            conn.executemany(f"{verb} INTO token_metrics(seq_id, metric_id, data) VALUES (?, ?, ?)", rows)  # noqa: S608

    def _write_activation(self, conn: sqlite3.Connection, run_id: int, seq_id: int, layer: str, acts: Any,
                          dtype: str | None, meta: dict[str, Any], index: int) -> None:
        done = isinstance(acts, WrittenBlock)
        sparse = acts.sparse if done else isinstance(acts, SparseActs)
        if not sparse and not done:
            acts = np.asarray(acts)
        width = acts.width if sparse or done else int(acts.shape[1])
        info = self._layer_cache.get(layer)
        if info is None:
            extra = dict(meta)
            info = self.register_layer(
                layer, width, dtype=dtype or "float16", kind=extra.pop("kind", None),
                storage="sparse" if sparse else "dense", hook_name=extra.pop("hook_name", None),
                source=extra.pop("source", None), artifact_id=extra.pop("artifact_id", None),
                run_id=run_id, meta=extra,
            )
        elif info.width != width:
            raise ShapeError(f"layer {layer!r} is stored with width {info.width}, got width {width}")
        if (info.storage == "sparse") != sparse:
            raise ShapeError(f"layer {layer!r} is stored {info.storage}; got {'sparse' if sparse else 'dense'} "
                             "activations")
        if done and acts.layer_dtype != info.dtype:
            raise ShardError(f"layer {layer!r} is stored as {info.dtype}; a worker encoded prompt {index}'s block "
                             f"for {acts.layer_dtype} (the layer was registered meanwhile): run the collection again")
        in_shard = self.activation_tier == "parquet"
        if done and not in_shard:
            raise ShardError(f"layer {layer!r}, prompt {index}: the record holds a block already written to a shard, "
                             "but this store keeps its activations in SQLite; hand it the arrays instead")
        block = acts if done else codec.encode_block(acts, info.dtype, self.float16_overflow, layer, index)
        try:
            cur = conn.execute(
                "INSERT INTO activations(layer_id, seq_id, n_positions, dtype, k, index_dtype, data, indices, run_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.layer_id, seq_id, block.n_positions, block.dtype, block.k, block.index_dtype,
                 b"" if in_shard else block.data, None if in_shard else block.indices, run_id),
            )
        except sqlite3.IntegrityError as exc:
            raise LayerExistsError(
                f"layer {layer!r} is already stored for prompt {index}; db.delete_layer({layer!r}) first "
                "to recollect it"
            ) from exc
        if done:  # already in a shard file: recorded when the batch is flushed
            self._queue_written(int(cur.lastrowid), info.layer_id, run_id, acts)
        elif in_shard:  # the block goes to a shard file when the batch is flushed, before its commit
            self._queue_block(int(cur.lastrowid), info.layer_id, run_id, block.dtype,
                              width if block.k is None else block.k,
                              block.index_dtype, ShardBlock(seq_id, block.n_positions, block.data, block.indices))
        if not sparse and not done:  # the search index sees the values as stored (float16-rounded, say)
            self._index_block(info.layer_id, width, index, codec.as_stored(block.data, block.dtype,
                                                                          (block.n_positions, width)))

    def write_activations(
        self,
        run_id: int,
        layer: str,
        items: Sequence[tuple[int, Any]],
        *,
        dtype: str = "float16",
        layer_meta: dict[str, Any] | None = None,
    ) -> int:
        """Attach a layer's activations to sequences already stored (e.g. latents backfilled from a
        stored layer), one transaction: ``items`` are ``(prompt_index, [positions, channels] array or
        SparseActs)`` whose positions match the stored sequence. Returns the rows written."""
        self._pending_blocks, self._pending_written = [], []
        with self.atomic() as conn:
            for index, acts in items:
                row = conn.execute("SELECT seq_id, n_positions FROM sequences WHERE prompt_index=?",
                                   (int(index),)).fetchone()
                if row is None:
                    raise ConfigError(f"no stored prompt with index {index}; write it with write() first")
                rows = acts.shape[0]
                if rows != row[1]:
                    raise ShapeError(f"prompt {index} has {row[1]} positions; got activations for {rows}")
                self._write_activation(conn, run_id, int(row[0]), layer, acts, dtype, layer_meta or {}, int(index))
            self._flush_blocks(conn)
        return len(items)

