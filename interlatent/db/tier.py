"""Where a store keeps its bulk activations: SQLite BLOBs (the default) or Parquet shards.

The tier is chosen when a store is created and recorded in ``store_settings``; SQLite stays the
catalog in both. Every ``activations`` row exists in both tiers (readers, completeness, resume and
counts use them); a parquet-tier row keeps an empty ``data`` BLOB and says where its block lives
(``shard_id``, ``shard_row``). A write encodes its blocks exactly as for SQLite, writes one shard file
per (layer, run, row dtype) of the batch and commits the catalog rows in the same transaction. A
crash between the two leaves only a file nothing refers to: :meth:`Tiers.vacuum_shards` (run by a
writable open) deletes those, but never one of a run whose process is still alive. Deleting or
replacing a layer deletes its files once the transaction has committed.

Other processes may write a run's shard files themselves (collection workers, with a
:class:`~interlatent.db.shardwriter.ShardWriter` from :meth:`Tiers.shard_writer`); the records they
hand back carry :class:`~interlatent.db.records.WrittenBlock` values, and the write commits the catalog
rows that refer to those files, the rows it would have written for the blocks themselves. Their
files lie under the run's folder, so the same vacuum rule covers them: kept while the run's process
(the one that commits) is alive, deleted once it is gone if no commit refers to them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interlatent.db.columns import now
from interlatent.db.layers import LayerRegistry
from interlatent.db.owners import owner_alive
from interlatent.db.records import WrittenBlock
from interlatent.db.shards import ShardBlock, ShardFiles, is_url
from interlatent.db.shardwriter import ShardWriter
from interlatent.errors import ConfigError, ShardError

if TYPE_CHECKING:
    from interlatent.db.reader import ActivationRow

log = logging.getLogger(__name__)

TIERS = ("sqlite", "parquet")
WINDOW_BYTES = 64 << 20  # activations read ahead at most, in storage order, when a reader asks out of order


def default_shard_root(db_path: Path) -> str:
    """The shard folder of a store, relative to the store's folder: ``<name>.db.shards``."""
    return f"{db_path.name}.shards"


def recorded_root(shard_root: str | Path | None, db_path: Path) -> str:
    """How a shard root is recorded: a URL as given; a local folder relative to the store's folder
    when inside it (so the folder moves with the store), else absolute."""
    if shard_root is None:
        return default_shard_root(db_path)
    text = str(shard_root)
    if is_url(text):
        return text
    path = Path(text).expanduser().resolve()
    base = db_path.parent.resolve()
    return Path(os.path.relpath(path, base)).as_posix() if path.is_relative_to(base) else str(path)


class Tiers(LayerRegistry):
    """The part of :class:`~interlatent.db.store.LatentDB` that knows where activations live."""

    activation_tier: str
    _shard_files: ShardFiles | None
    _shard_paths: dict[int, str]
    _pending_blocks: list[tuple[int, int, int | None, str, int, str | None, ShardBlock]]
    _pending_written: list[tuple[int, int, int | None, WrittenBlock]]
    float16_overflow: str

    def _settings(self) -> dict[str, str]:
        return dict(self._q("SELECT key, value FROM store_settings"))

    def _open_tier(self, activations: str | None, shard_root: str | Path | None) -> None:
        self._shard_files, self._shard_paths, self._pending_blocks, self._pending_written = None, {}, [], []
        if activations is not None and activations not in TIERS:
            raise ConfigError(f"activations must be one of {TIERS}, got {activations!r}")
        settings = self._settings()
        recorded = settings.get("activations", "sqlite")
        fresh = not self._q("SELECT 1 FROM runs LIMIT 1") and not self._q("SELECT 1 FROM layers LIMIT 1")
        wanted_root = None if shard_root is None else recorded_root(shard_root, self.path)
        changes = (activations is not None and activations != recorded) or (
            wanted_root is not None and wanted_root != settings.get("shard_root"))
        if changes and not (fresh and self.mode == "rw"):
            asked = activations or recorded
            raise ConfigError(
                f"the store {str(self.path)!r} keeps its activations in {recorded}"
                f"{' under ' + repr(settings['shard_root']) if 'shard_root' in settings else ''}; got "
                f"activations={asked!r}{', shard_root=' + repr(wanted_root) if wanted_root else ''}: the tier is "
                f"chosen when a store is created; convert it with `interlatent export {self.path} NEW.db "
                f"--activations {asked}`, or open it with LatentDB(path)")
        if changes:
            tier = activations or recorded
            if tier == "sqlite" and wanted_root is not None:
                raise ConfigError("shard_root is for activations='parquet'; the sqlite tier keeps no shard files")
            with self.atomic() as conn:
                conn.execute("INSERT OR REPLACE INTO store_settings(key, value) VALUES ('activations', ?)", (tier,))
                conn.execute("DELETE FROM store_settings WHERE key='shard_root'")
                if tier == "parquet":
                    conn.execute("INSERT INTO store_settings(key, value) VALUES ('shard_root', ?)",
                                 (wanted_root or default_shard_root(self.path),))
            settings = self._settings()
        self.activation_tier = settings.get("activations", "sqlite")
        if self.activation_tier == "parquet":
            self._shard_files = ShardFiles(settings.get("shard_root") or default_shard_root(self.path),
                                           self.path.parent)

    @property
    def shard_root(self) -> str | None:
        """The shard root as recorded (relative to the store's folder, absolute, or a URL); None for
        a store that keeps its activations in SQLite."""
        return None if self._shard_files is None else self._shard_files.recorded

    @property
    def shard_root_shared(self) -> bool:
        """True when other processes can write this store's shards (:meth:`shard_writer`): a parquet
        store whose shard root is a local folder or a URL other than ``memory://``."""
        return self._shard_files is not None and self._shard_files.shared

    def shard_writer(self, run_id: int, dtypes: dict[str, str] | None = None) -> ShardWriter:
        """What another process needs to write blocks of run ``run_id`` to this store's shards itself
        (picklable; see :mod:`interlatent.db.shardwriter`): the records it returns go to
        :meth:`~interlatent.db.writer.Writer.write` as usual. ``dtypes``: storage dtype of layers
        not stored yet, as ``write`` takes them. Layers stored already keep their ids and dtypes."""
        files = self._shard_files
        if files is None or not files.shared:
            where = "SQLite" if files is None else f"{files.recorded!r}, which only this process can reach"
            raise ConfigError(f"the store {str(self.path)!r} keeps its activations in {where}: other processes "
                              "cannot write them; write the records with db.write (a store created with "
                              "activations='parquet' and a folder or shared URL as shard root can)")
        if files.local:
            files.fs.makedirs(files.root, exist_ok=True)  # so that a worker can tell it reaches the folder
        layers = {name: (int(lid), dtype) for name, lid, dtype in self._q("SELECT name, layer_id, dtype FROM layers")}
        root = os.path.abspath(files.root) if files.local else files.recorded  # workers may have another cwd
        return ShardWriter(root, int(run_id), layers, dict(dtypes or {}), self.float16_overflow)

    # ------------------------------------------------------------------ writing
    def _queue_block(self, act_id: int, layer_id: int, run_id: int | None, dtype: str, width: int,
                     index_dtype: str | None, block: ShardBlock) -> None:
        self._pending_blocks.append((act_id, layer_id, run_id, dtype, width, index_dtype, block))

    def _queue_written(self, act_id: int, layer_id: int, run_id: int | None, block: WrittenBlock) -> None:
        if ShardFiles.run_of(block.path) != (0 if run_id is None else run_id):
            raise ShardError(f"shard {block.path!r} was written for another run than run {run_id}, which commits "
                             "it; a worker's manifest belongs to the run whose shard writer it used")
        self._pending_written.append((act_id, layer_id, run_id, block))

    def _flush_blocks(self, conn: sqlite3.Connection) -> None:
        """Write the queued blocks as shard files (one per layer, run and row encoding), record files
        other processes wrote, and point their catalog rows at them, inside the caller's transaction."""
        self._flush_written(conn)
        pending, self._pending_blocks = self._pending_blocks, []
        if not pending:
            return
        if self._shard_files is None:
            raise ShardError("blocks were queued for shards in a store that keeps its activations in SQLite")
        groups: dict[tuple[Any, ...], list[tuple[int, ShardBlock]]] = {}
        for act_id, layer_id, run_id, dtype, width, index_dtype, block in pending:
            groups.setdefault((layer_id, run_id, dtype, width, index_dtype), []).append((act_id, block))
        for (layer_id, run_id, dtype, width, index_dtype), items in groups.items():
            blocks = [b for _, b in items]
            rel, size, firsts = self._shard_files.write(run_id, layer_id, dtype, width, index_dtype, blocks)
            cur = conn.execute("INSERT INTO shards(layer_id, run_id, path, n_rows, n_bytes, created_at)"
                               " VALUES (?, ?, ?, ?, ?, ?)",
                               (layer_id, run_id, rel, sum(b.n_positions for b in blocks), size, now()))
            shard_id = int(cur.lastrowid)
            conn.executemany("UPDATE activations SET shard_id=?, shard_row=? WHERE act_id=?",
                             [(shard_id, first, act_id) for (act_id, _), first in zip(items, firsts)])
            self._shard_paths[shard_id] = rel

    def _flush_written(self, conn: sqlite3.Connection) -> None:
        pending, self._pending_written = self._pending_written, []
        by_file: dict[str, list[tuple[int, int, int | None, WrittenBlock]]] = {}
        for item in pending:
            by_file.setdefault(item[3].path, []).append(item)
        for path, items in by_file.items():
            _, layer_id, run_id, first = items[0]
            if any(layer != layer_id for _, layer, _, _ in items):
                raise ShardError(f"shard {path!r} holds blocks of several layers; a shard holds one layer's blocks")
            rel = self._shard_files.place(path, layer_id, first.file_bytes)  # type: ignore[union-attr]
            cur = conn.execute("INSERT INTO shards(layer_id, run_id, path, n_rows, n_bytes, created_at)"
                               " VALUES (?, ?, ?, ?, ?, ?)", (layer_id, run_id, rel, first.file_rows,
                                                              first.file_bytes, now()))
            shard_id = int(cur.lastrowid)
            conn.executemany("UPDATE activations SET shard_id=?, shard_row=? WHERE act_id=?",
                             [(shard_id, b.first_row, act_id) for act_id, _, _, b in items])
            self._shard_paths[shard_id] = rel

    def _drop_unused(self, offered: set[str], used: set[str]) -> None:
        """Delete, once the write commits, files another process wrote for it that it did not use
        (every block of theirs was already stored: ``duplicates='attach'``)."""
        unused = sorted(offered - used)
        files = self._shard_files
        if unused and files is not None:
            self.after_commit(lambda: files.delete(unused))

    # ------------------------------------------------------------------ reading
    def _shard_path(self, shard_id: int) -> str:
        if shard_id not in self._shard_paths:
            self._shard_paths.update(dict(self._q("SELECT shard_id, path FROM shards")))
        if shard_id not in self._shard_paths:
            raise ShardError(f"the catalog refers to shard {shard_id}, which it does not list; the store is damaged")
        return self._shard_paths[shard_id]

    def _read_windows(self, order: list[int], rows: dict[int, ActivationRow], width: int) -> Iterator[list[int]]:
        """``order`` (seq ids of ``rows``) in consecutive windows of at most :data:`WINDOW_BYTES` of
        activations; in the parquet tier each window's blocks are read first, in the order they lie
        in their shards, so a shuffled order reads each row group once per window, not once per block."""
        if self._shard_files is None:
            yield order
            return
        start, size = 0, 0
        for i, sid in enumerate(order):
            size += rows[sid].n_positions * (rows[sid].k or width) * 4
            if size >= WINDOW_BYTES or i == len(order) - 1:
                window = order[start : i + 1]
                for key in sorted(window, key=lambda s: (rows[s].shard_id or 0, rows[s].shard_row or 0)):
                    rows[key] = self._with_block(rows[key])
                yield window
                start, size = i + 1, 0

    def _with_block(self, row: ActivationRow) -> ActivationRow:
        """The row with its encoded block at hand (read from its shard for the parquet tier)."""
        if row.shard_id is None:
            return row
        if self._shard_files is None:
            raise ShardError(f"sequence {row.seq_id} has its activations in shard {row.shard_id}, but the store "
                             "records no shard root")
        data, indices = self._shard_files.read(self._shard_path(row.shard_id), int(row.shard_row), row.n_positions)
        return row._replace(data=data, indices=indices, shard_id=None, shard_row=None)

    # ------------------------------------------------------------------ deleting
    def _delete_layer_rows(self, layer_id: int) -> None:
        rels = [r[0] for r in self._q("SELECT path FROM shards WHERE layer_id=?", (layer_id,))]
        self._conn.execute("DELETE FROM activations WHERE layer_id=?", (layer_id,))
        self._conn.execute("DELETE FROM shards WHERE layer_id=?", (layer_id,))
        super()._delete_layer_rows(layer_id)
        files = self._shard_files
        if rels and files is not None:
            self.after_commit(lambda: files.delete(rels))

    def vacuum_shards(self) -> list[str]:
        """Delete shard files the catalog does not refer to (left by a writer killed between writing a
        file and committing it, or by a failed delete), except those of a run whose process is alive
        (it may be about to commit them). Returns the relative paths deleted."""
        if self._shard_files is None:
            return []
        self._require_writable()
        referenced = {r[0] for r in self._q("SELECT path FROM shards")}
        live = {int(rid) for rid, host, pid, ident in
                self._q("SELECT run_id, owner_host, owner_pid, owner_started FROM runs WHERE status='running'")
                if owner_alive(host, pid, ident) is not False}
        orphans = [rel for rel in self._shard_files.files()
                   if rel not in referenced and ShardFiles.run_of(rel) not in live]
        if orphans:
            self._shard_files.delete(orphans)
            log.warning("%s: deleted %d activation shard files that no committed write refers to", self.path,
                        len(orphans))
        return orphans
