"""The layer registry: which layers a store holds, what they are, and the names that find them.

A layer is one row of ``layers`` (name, kind, width, storage dtype, dense or sparse, the hook it
came from, the layer it was computed from); its data is one ``activations`` row per (layer,
sequence). Names resolve through the grammar of :mod:`interlatent.naming`: the stored name, a
negative block index, the raw hook name recorded at collection, or a latent layer spelled with
another name of its source layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from interlatent import naming
from interlatent.db import codec
from interlatent.db.columns import decode_json, dumps, like_pattern, now, pd
from interlatent.db.connection import StoreConnection
from interlatent.errors import ConfigError, LayerNotFoundError, ShapeError, unknown_name

# every table with rows keyed by layer_id, the layer's own row last
_LAYER_TABLES = ("activations", "latent_examples", "latent_explanations", "stats", "correlations", "logit_effects",
                 "search_index", "search_index_log", "search_index_layers")


def layer_kind(name: str) -> str:
    """The kind of a layer from its name: ``latent_sae:``/``latent:``/``probe:`` prefixes, else model."""
    prefix, _ = naming.split_latent(name)
    if prefix is not None:
        return prefix.rstrip(":")
    return "probe" if name.startswith("probe:") else "model"


@dataclass(frozen=True)
class LayerInfo:
    """A stored layer: its name, kind, width, storage dtype and where it came from."""

    name: str
    kind: str
    width: int
    dtype: str
    storage: str
    hook_name: str | None
    source: str | None
    artifact_id: int | None
    run_id: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    layer_id: int = -1


class LayerRegistry(StoreConnection):
    """The part of :class:`~interlatent.db.store.LatentDB` that knows the stored layers."""

    def _load_layers(self) -> None:
        self._layer_cache = {}
        for row in self._q("SELECT layer_id, name, kind, width, dtype, storage, hook_name, source,"
                           " artifact_id, run_id, meta FROM layers"):
            info = LayerInfo(name=row[1], kind=row[2], width=row[3], dtype=row[4], storage=row[5],
                             hook_name=row[6], source=row[7], artifact_id=row[8], run_id=row[9],
                             meta=decode_json(row[10], {}), layer_id=row[0])
            self._layer_cache[info.name] = info

    def layers(self, prefix: str | None = None) -> list[str]:
        """Names of stored layers (optionally only those starting with ``prefix``), sorted. A layer
        still being built (see :meth:`replace_layer`) is not listed."""
        self._load_layers()
        return sorted(n for n in self._layer_cache
                      if (prefix is None or n.startswith(prefix)) and not naming.is_building(n))

    def resolve_layer(self, name: str) -> str:
        """The stored name for ``name``: exact, a negative block index (``llm.layer.-1``), or a raw
        hook name recorded at collection. Raises :class:`LayerNotFoundError` with close names."""
        if name not in self._layer_cache:
            self._load_layers()
        if name in self._layer_cache:
            return name
        for info in self._layer_cache.values():
            n_blocks = info.meta.get("n_blocks")
            candidate = None if n_blocks is None else naming.with_block_counted(name, int(n_blocks))
            if candidate in self._layer_cache:
                return candidate
        for info in self._layer_cache.values():
            if info.hook_name == name:
                return info.name
        canonical = naming.canonical_hook_name(name)  # blocks.N.hook_... of a store written without hook names
        if canonical != name and canonical in self._layer_cache:
            return canonical
        prefix, source = naming.split_latent(name)
        if prefix is not None and source:  # latent_sae:/latent: of another spelling of its source layer
            try:
                resolved = self.resolve_layer(source)
            except LayerNotFoundError:  # a transcoder's block, whose resid_post need not be stored
                resolved = naming.canonical_hook_name(source)
            if resolved != source:
                with contextlib.suppress(LayerNotFoundError):
                    return self.resolve_layer(prefix + resolved)
        raise unknown_name("layer", name, [n for n in self._layer_cache if not naming.is_building(n)],
                           hint="db.layers() lists what is stored")

    def layer_info(self, name: str) -> LayerInfo:
        resolved = self.resolve_layer(name)  # may reload the cache: look it up afterwards
        return self._layer_cache[resolved]

    def register_layer(
        self,
        name: str,
        width: int,
        *,
        dtype: str = "float16",
        kind: str | None = None,
        storage: str = "dense",
        hook_name: str | None = None,
        source: str | None = None,
        artifact_id: int | None = None,
        run_id: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LayerInfo:
        """Declare a layer before writing it (writes declare unknown layers themselves).

        Raises :class:`ShapeError` when the layer exists with another width.
        """
        codec.check_dtype(dtype)
        if storage not in ("dense", "sparse"):
            raise ConfigError(f"storage must be 'dense' or 'sparse', got {storage!r}")
        with self.atomic() as conn:
            row = conn.execute("SELECT layer_id, width FROM layers WHERE name=?", (name,)).fetchone()
            if row is not None:
                if row[1] != width:
                    raise ShapeError(f"layer {name!r} is stored with width {row[1]}, got arrays of width {width}")
            else:
                conn.execute(
                    "INSERT INTO layers(name, kind, width, dtype, storage, hook_name, source, artifact_id,"
                    " run_id, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, kind or layer_kind(name), int(width), dtype, storage, hook_name, source,
                     artifact_id, run_id, dumps(meta or {}), now()),
                )
            self._load_layers()
        return self._layer_cache[name]

    def delete_layer(self, name: str) -> None:
        """Remove a layer with its activations, stats, correlations, examples and explanations."""
        name = self.resolve_layer(name)
        with self.atomic():
            self._delete_layer_rows(self._layer_cache[name].layer_id)
        self._load_layers()

    def _delete_layer_rows(self, layer_id: int) -> None:
        for table in (*_LAYER_TABLES, "layers"):
            self._conn.execute(f"DELETE FROM {table} WHERE layer_id=?", (layer_id,))  # noqa: S608 (fixed names)

    def replace_layer(self, built: str, name: str) -> None:
        """Make layer ``built`` the layer ``name``, in one transaction: a stored ``name`` goes with
        its activations, stats, correlations, examples and explanations, and ``built`` is renamed.

        A re-trained latent layer is written under :func:`interlatent.naming.building_name` and
        swapped in here, so a crash before this commit leaves the previous layer as it was."""
        with self.atomic() as conn:
            row = conn.execute("SELECT layer_id FROM layers WHERE name=?", (built,)).fetchone()
            if row is None:
                raise unknown_name("layer", built, self._layer_cache, hint="write the built layer first")
            old = conn.execute("SELECT layer_id FROM layers WHERE name=?", (name,)).fetchone()
            if old is not None:
                self._delete_layer_rows(int(old[0]))
            conn.execute("UPDATE layers SET name=? WHERE layer_id=?", (name, int(row[0])))
        self._load_layers()

    def recorded_model(self, layer: str, *also: str | None) -> str | None:
        """The model name recorded for the layer ``layer`` was computed from (its ``in_layer``, then
        its ``source``, then the names in ``also``), or None."""
        info = self.layer_info(layer)
        for name in (info.meta.get("in_layer"), info.source, *also):
            if not name:
                continue
            try:
                model = self.layer_info(name).meta.get("model")
            except KeyError:
                continue
            if model:
                return str(model)
        return None

    def n_tokens(self, layer: str) -> int:
        """Number of stored token rows of a layer."""
        info = self.layer_info(layer)
        return int(self._conn.execute("SELECT COALESCE(SUM(n_positions), 0) FROM activations WHERE layer_id=?",
                                      (info.layer_id,)).fetchone()[0])

    def layer_table(self, prefix: str | None = None) -> pd.DataFrame:
        """Layers with kind, width, dtype, storage, token and sequence counts, hook name and source."""
        df = pd.read_sql_query(
            "SELECT l.name AS layer, l.kind, l.width, l.dtype, l.storage, l.hook_name, l.source,"
            " COUNT(a.act_id) AS sequences, COALESCE(SUM(a.n_positions), 0) AS tokens,"
            " COALESCE(SUM(LENGTH(a.data) + COALESCE(LENGTH(a.indices), 0)), 0)"
            " + COALESCE((SELECT SUM(sh.n_bytes) FROM shards sh WHERE sh.layer_id = l.layer_id), 0) AS bytes"
            " FROM layers l LEFT JOIN activations a ON a.layer_id = l.layer_id WHERE l.name NOT LIKE ? ESCAPE '\\'"
            " GROUP BY l.layer_id ORDER BY l.name", self._conn, params=[like_pattern(naming.BUILDING_PREFIX)[1:]])
        if prefix is not None:
            df = df[df["layer"].str.startswith(prefix)].reset_index(drop=True)
        return df
