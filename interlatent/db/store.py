"""``LatentDB``: the SQLite activation store, one facade over the modules of :mod:`interlatent.db`.

Layout (the tables are in :mod:`interlatent.db.schema`): one row per run, one per sequence (a prompt
or an episode) with one ``tokens`` row holding all its positions, and one row per (layer, sequence)
holding that sequence's ``[positions, channels]`` matrix as a BLOB. Writes are one transaction per
call (:meth:`~interlatent.db.connection.StoreConnection.atomic` nests); readers stream arrays.
``LatentDB`` is made of these parts, each a module of this package:

==============  =================================================================
connection      opening, pragmas, migrations, read-only and immutable reads, atomic()
layers          the layer registry and name resolution (grammar: interlatent.naming)
runs            runs, stale runs, completeness (owners: owner processes, SIGTERM)
writer          sequences, tokens, metrics and activations, batch by batch
reader          sequences, tokens and activations as DataFrames or streamed arrays
catalog         label classes, explanations, artifacts, interventions
summaries       per-channel statistics and top examples, computed and read
search_index    per-channel top values kept as data is written, for searches that do not scan
token_index     the distinct token texts and the sequences holding each, for token filters
==============  =================================================================

Beside them: ``schema`` (the tables, as named migrations), ``records`` (what writers hand the store),
``codec`` (arrays <-> BLOBs), ``columns`` (JSON, LIKE and IN-list helpers), ``background`` (a
writer thread with its own connection, fed by a bounded queue: how collectors write), and the numpy
algorithms ``stats`` (moments, correlations), ``topk`` (top examples) and ``shuffle`` (chunked,
shuffled streaming).
"""

from __future__ import annotations

from pathlib import Path

from interlatent.db.catalog import Catalog
from interlatent.db.columns import decode_json, dumps
from interlatent.db.layers import LayerInfo, layer_kind
from interlatent.db.owners import OWNER_GONE, owner_alive, process_identity
from interlatent.db.reader import Activations
from interlatent.db.runs import LayerCompleteness, Run, RunLog
from interlatent.db.summaries import Summaries
from interlatent.db.writer import Writer
from interlatent.errors import ConfigError

__all__ = ["OWNER_GONE", "Activations", "LatentDB", "LayerCompleteness", "LayerInfo", "Run", "decode_json", "dumps",
           "layer_kind", "owner_alive", "process_identity"]


class LatentDB(Summaries, Writer, RunLog, Catalog):
    """The activation store.

    Args:
        uri: ``"sqlite:///path.db"`` or a bare path ``"path.db"``.
        mode: ``"rw"`` (default) creates the file if missing and applies pending migrations;
            ``"r"`` opens read-only and raises :class:`DatabaseNotFoundError` for a missing path
            (in a read-only folder, where SQLite cannot create its ``-shm`` file, the store is read
            as immutable). A writable open of a read-only file or folder raises
            :class:`ReadOnlyError`; a writable open also marks runs whose process is gone
            ``interrupted`` (see :meth:`stale_runs`).
        float16_overflow: what a float16 layer does with a batch whose values exceed float16's
            range: ``"promote"`` (default) stores those rows as float32 and logs a warning;
            ``"raise"`` raises :class:`DtypeRangeError` and writes nothing of that batch.
            Values are never clipped.
        activations: where a new store keeps its bulk activations: ``"sqlite"`` (BLOBs in the
            store file, the default) or ``"parquet"`` (immutable Parquet shards under
            ``shard_root``; the catalog stays in SQLite). Recorded in the store: later opens need
            not repeat it, and asking an existing store for the other tier raises
            :class:`ConfigError` (``interlatent export`` converts a store).
        shard_root: the shard folder of a new parquet store: a path (default
            ``<name>.db.shards`` beside the store, recorded relative to it when inside the store's
            folder) or an fsspec URL (``file://...``, ``memory://...``). One shard root per store:
            a writable open deletes files under it that the store does not refer to.
        durability: ``"full"`` (default) makes the store survive power loss and OS crashes
            (SQLite ``synchronous=NORMAL``: the disk is synced at WAL checkpoints);
            ``"process"`` skips those syncs — several times faster to ingest, and still safe
            against the process crashing or being interrupted, like files written with
            ``numpy.save``, but not against power loss.

    Use as a context manager to close it on exit. ``with db.atomic():`` makes several calls one
    all-or-nothing write.
    """

    def __init__(self, uri: str | Path, *, mode: str = "rw", float16_overflow: str = "promote",
                 durability: str = "full", activations: str | None = None,
                 shard_root: str | Path | None = None) -> None:
        if float16_overflow not in ("promote", "raise"):
            raise ConfigError(f"float16_overflow must be 'promote' or 'raise', got {float16_overflow!r}")
        self.float16_overflow = float16_overflow
        self._open(uri, mode, durability)
        try:
            self._open_tier(activations, shard_root)
            self._recover_stale_runs()
            if self.mode == "rw":
                self.vacuum_shards()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        files = getattr(self, "_shard_files", None)
        if files is not None:
            files.close()
        super().close()
