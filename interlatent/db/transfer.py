"""Converting a whole store between activation tiers, losslessly.

:func:`convert_store` copies the catalog with SQLite's backup API (every table, artifacts with
their bytes included) into a new store, then moves each activation block between a BLOB and a shard
as the bytes it was stored as: no value is decoded, so float16 bit patterns, promoted float32 rows,
bfloat16 and sparse indices arrive exactly. ``activations`` rows keep their ids. A conversion that
fails removes what it wrote, so the destination either is a whole store or does not exist.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from interlatent.db.columns import now
from interlatent.db.connection import parse_uri
from interlatent.db.reader import ActivationRow
from interlatent.db.shards import ShardBlock, ShardFiles
from interlatent.db.store import LatentDB
from interlatent.db.tier import TIERS, recorded_root
from interlatent.errors import ConfigError, DatabaseNotFoundError

log = logging.getLogger(__name__)

SHARD_TOKENS = 65_536  # token rows per shard file written by a conversion


class Converted(NamedTuple):
    """What a conversion did: the destination, its tier, and how much it moved."""

    path: Path
    activations: str
    shard_root: str | None
    layers: int
    rows: int
    tokens: int
    shards: int


def _remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


def _blocks(src: LatentDB, layer_id: int) -> Iterator[tuple[int, int | None, ActivationRow]]:
    """(act_id, run_id, row with its encoded block) of a layer, in act_id order, read from ``src``."""
    cur = src._conn.execute(
        "SELECT act_id, run_id, seq_id, n_positions, dtype, k, index_dtype, data, indices, shard_id, shard_row"
        " FROM activations WHERE layer_id=? ORDER BY act_id", (layer_id,))
    for act_id, run_id, *row in cur:
        yield int(act_id), run_id, src._with_block(ActivationRow(*row))


def convert_store(src: str | Path, dst: str | Path, *, activations: str = "parquet",
                  shard_root: str | Path | None = None, force: bool = False) -> Converted:
    """Copy the store ``src`` to a new store ``dst`` whose activations live in ``activations``
    (``"parquet"`` or ``"sqlite"``), every table and every block bit-exact.

    ``shard_root`` is the new store's shard folder or fsspec URL (default ``<dst>.shards`` beside it).
    An existing ``dst`` is refused unless ``force=True``, which replaces it (a shard root belongs to
    one store: the new store deletes files under it that it does not refer to)."""
    if activations not in TIERS:
        raise ConfigError(f"activations must be one of {TIERS}, got {activations!r}")
    src_path, dst_path = parse_uri(src), parse_uri(dst)
    if not src_path.is_file():
        raise DatabaseNotFoundError(f"no store at {str(src_path)!r}; give the path of an existing store")
    if dst_path.exists() or Path(f"{dst_path}-wal").exists():
        if not force:
            raise ConfigError(f"{str(dst_path)!r} exists; choose a new path for the converted store, or pass "
                              "force=True (--force) to replace it")
        if dst_path.resolve() == src_path.resolve():
            raise ConfigError(f"the destination {str(dst_path)!r} is the source store; choose another path")
        _remove_store(dst_path)
    if activations == "sqlite" and shard_root is not None:
        raise ConfigError("shard_root is for activations='parquet'; the sqlite tier keeps no shard files")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    root = recorded_root(shard_root, dst_path) if activations == "parquet" else None
    files: ShardFiles | None = None
    written: list[str] = []
    try:
        with LatentDB(src_path, mode="r") as source:
            out = sqlite3.connect(str(dst_path), isolation_level=None)
            try:
                source._conn.backup(out)
                files = ShardFiles(root, dst_path.parent) if root is not None else None
                theirs = source._shard_files
                if files is not None and theirs is not None and (type(files.fs), files.root) == (
                        type(theirs.fs), theirs.root):
                    raise ConfigError(f"the shard root {root!r} is the source store's own; a shard root belongs to "
                                      "one store: give DEST another --shard-root")
                counts = _move_blocks(source, out, files, written)
                out.execute("BEGIN IMMEDIATE")
                out.execute("INSERT OR REPLACE INTO store_settings(key, value) VALUES ('activations', ?)",
                            (activations,))
                out.execute("DELETE FROM store_settings WHERE key='shard_root'")
                if root is not None:
                    out.execute("INSERT INTO store_settings(key, value) VALUES ('shard_root', ?)", (root,))
                out.execute("COMMIT")
                out.execute("VACUUM")
            finally:
                out.close()
        with LatentDB(dst_path) as db:  # a writable open checks the result and clears stale shard files
            counted = int(db._q("SELECT COUNT(*) FROM activations")[0][0])
    except BaseException:
        _remove_store(dst_path)
        if files is not None and written:
            files.delete(written)
        raise
    log.info("converted %s -> %s (%s): %d activation rows", src_path, dst_path, activations, counted)
    return Converted(dst_path, activations, root, counts["layers"], counts["rows"], counts["tokens"], len(written))


def _move_blocks(src: LatentDB, out: sqlite3.Connection, files: ShardFiles | None,
                 written: list[str]) -> dict[str, int]:
    """Rewrite every activation row of ``out`` (a copy of ``src``'s catalog) into the tier of
    ``files`` (BLOBs when None), one transaction per layer."""
    counts = {"layers": 0, "rows": 0, "tokens": 0}
    layer_ids = [int(r[0]) for r in out.execute("SELECT layer_id FROM layers ORDER BY layer_id").fetchall()]
    out.execute("BEGIN IMMEDIATE")
    out.execute("UPDATE activations SET shard_id=NULL, shard_row=NULL")
    out.execute("DELETE FROM shards")
    out.execute("COMMIT")
    for layer_id in layer_ids:
        counts["layers"] += 1
        out.execute("BEGIN IMMEDIATE")
        groups: dict[tuple[Any, ...], list[tuple[int, ShardBlock]]] = {}
        size: dict[tuple[Any, ...], int] = {}
        width_of = int(out.execute("SELECT width FROM layers WHERE layer_id=?", (layer_id,)).fetchone()[0])
        for act_id, run_id, row in _blocks(src, layer_id):
            counts["rows"] += 1
            counts["tokens"] += row.n_positions
            if files is None:
                out.execute("UPDATE activations SET data=?, indices=? WHERE act_id=?", (row.data, row.indices, act_id))
                continue
            key = (run_id, row.dtype, width_of if row.k is None else int(row.k), row.index_dtype)
            groups.setdefault(key, []).append((act_id, ShardBlock(row.seq_id, row.n_positions, row.data, row.indices)))
            size[key] = size.get(key, 0) + row.n_positions
            if size[key] >= SHARD_TOKENS:
                _write_shard(out, files, layer_id, key, groups.pop(key), written)
                del size[key]
        for key, items in groups.items():
            _write_shard(out, files, layer_id, key, items, written)
        out.execute("COMMIT")
    return counts


def _write_shard(out: sqlite3.Connection, files: ShardFiles, layer_id: int, key: tuple[Any, ...],
                 items: list[tuple[int, ShardBlock]], written: list[str]) -> None:
    """One shard file of ``items`` (``(act_id, block)`` of one run and row encoding), its ``shards``
    row, and its activation rows pointed at it."""
    run_id, dtype, width, index_dtype = key
    blocks = [b for _, b in items]
    rel, n_bytes, firsts = files.write(run_id, layer_id, dtype, width, index_dtype, blocks)
    written.append(rel)
    cur = out.execute("INSERT INTO shards(layer_id, run_id, path, n_rows, n_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                      (layer_id, run_id, rel, sum(b.n_positions for b in blocks), n_bytes, now()))
    out.executemany("UPDATE activations SET data=x'', indices=NULL, shard_id=?, shard_row=? WHERE act_id=?",
                    [(int(cur.lastrowid), first, act_id) for (act_id, _), first in zip(items, firsts)])
