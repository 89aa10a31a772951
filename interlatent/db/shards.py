"""Parquet shard files: the bulk-activation tier beside the SQLite catalog.

A shard is one immutable Parquet file holding consecutive ``activations`` blocks of one layer written
by one run, one Parquet row per token position. Its columns carry exactly the bytes the SQLite tier
keeps in its BLOBs (:mod:`interlatent.db.codec`), so moving a block between the tiers is lossless:

==========  ==========================================================================
seq_id      int64: the sequence the row belongs to, or -1 in a shard written by a collection
            worker, which writes before the catalog gives its sequences their ids (the catalog's
            ``shard_id`` and ``shard_row`` say which rows are whose in every shard)
values      ``fixed_size_binary(width * itemsize)``: the row's little-endian float16, bfloat16
            (upper half of float32) or float32 values (width is ``k`` for sparse rows)
indices     sparse rows only: ``fixed_size_binary(k * itemsize)`` of uint16 or uint32 indices
==========  ==========================================================================

Each binary field records its element type and width in its Arrow metadata
(``interlatent.dtype``, ``interlatent.width``), so other readers can view it as
``[rows, width]`` numbers without a copy. Fixed-size binary rather than ``fixed_size_list`` keeps
float16 bit-exact just the same, and is read and written 10-40x faster (a list column encodes
repetition levels for every element).

Files live under a shard root (a local folder or an fsspec URL) at
``run=<run_id>/layer=<layer_id>/part-<uuid>.parquet``; they are written under a temporary name and
renamed, and the catalog refers to them by that relative path. A collection worker that writes a
block of a layer the store has not registered yet (so has no id for) writes it to
``run=<run_id>/staged/``, and the commit that registers the layer moves it into the layer's folder.
Reads go through a small LRU of open files and of decoded row groups, so streaming a layer in prompt
order reads each row group once and memory stays bounded. pyarrow and fsspec are imported when a shard is first touched.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from interlatent.errors import ShardError

log = logging.getLogger(__name__)

ROW_GROUP_BYTES = 1 << 18  # about 256 KiB of activations per row group: a shuffled read decodes little beside its rows
MIN_GROUP_ROWS = 128
OPEN_FILES = 256  # memory-mapped handles are cheap; reopening one costs its footer
CACHED_GROUPS = 16
PART = re.compile(r"^run=(\d+)/(layer=\d+|staged)/(part-[0-9a-f]+\.parquet|\.part-[0-9a-f]+\.parquet\.tmp)$")
STAGED = "staged"
_ITEM = {"float16": 2, "float32": 4, "bfloat16": 2, "<u2": 2, "<u4": 4}


class ShardBlock(NamedTuple):
    """One block to write: its sequence, the encoded value bytes, and the encoded indices (sparse)."""

    seq_id: int
    n_positions: int
    data: bytes
    indices: bytes | None


def is_url(root: str) -> bool:
    """True for an fsspec URL (``file://...``, ``memory://...``, ``s3://...``), False for a path."""
    return "://" in root


def _arrow_column(buf: bytes, kind: str, width: int, rows: int) -> Any:
    """An Arrow ``fixed_size_binary`` array of ``rows`` rows over the raw little-endian bytes ``buf``."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.binary(width * _ITEM[kind]), rows, [None, pa.py_buffer(buf)])


def _field(name: str, kind: str, width: int) -> Any:
    import pyarrow as pa

    meta = {"interlatent.dtype": {"<u2": "uint16", "<u4": "uint32"}.get(kind, kind), "interlatent.width": str(width)}
    return pa.field(name, pa.binary(width * _ITEM[kind]), nullable=False, metadata=meta)


def _column_bytes(column: Any) -> np.ndarray:
    """The raw bytes of a fixed-size binary Arrow column as uint8 ``[rows, row_bytes]``, without a copy."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_binary(arr.type) or arr.null_count:
        raise ShardError(f"a shard column is {arr.type} with {arr.null_count} nulls; shards hold fixed-size binary "
                         "columns without nulls: the file is not one this library wrote")
    width = arr.type.byte_width
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
    return raw[arr.offset * width : (arr.offset + len(arr)) * width].reshape(len(arr), width)


def _joined(parts: list[np.ndarray]) -> bytes | memoryview:
    return memoryview(parts[0]).cast("B") if len(parts) == 1 else b"".join(p.tobytes() for p in parts)


class ShardFiles:
    """The shard files of one store: write, read row ranges, list and delete.

    ``root`` is as recorded in the store: a path relative to ``base`` (the store's folder), an
    absolute path, or an fsspec URL (``file://``, ``memory://``, ``s3://`` ...)."""

    def __init__(self, root: str, base: Path) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.recorded = root
        if is_url(root):
            self.fs, self.root = fsspec.core.url_to_fs(root)
        else:
            path = Path(root).expanduser()
            self.fs, self.root = fsspec.filesystem("file"), str(path if path.is_absolute() else base / path)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._files: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return f"ShardFiles({self.recorded!r})"

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ------------------------------------------------------------------ writing
    @property
    def shared(self) -> bool:
        """True when other processes can write here: a local folder (for processes on this machine,
        or on any machine that mounts it at the same path) or a URL other than ``memory://``."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "memory" not in protocols

    def write(self, run_id: int | None, layer_id: int | None, dtype: str, width: int, index_dtype: str | None,
              blocks: list[ShardBlock]) -> tuple[str, int, list[int]]:
        """Write the blocks as one new file; returns its relative path, its size in bytes and the first
        row of each block. ``width`` is the layer's width (dense) or ``k`` (sparse); ``layer_id``
        None writes the file to the run's ``staged`` folder (see :meth:`place`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        firsts = np.concatenate([[0], np.cumsum([b.n_positions for b in blocks])]).astype(np.int64)
        rows = int(firsts[-1])
        seq = np.repeat([b.seq_id for b in blocks], [b.n_positions for b in blocks]).astype(np.int64)
        fields = [pa.field("seq_id", pa.int64(), nullable=False), _field("values", dtype, width)]
        arrays = [pa.array(seq), _arrow_column(b"".join(b.data for b in blocks), dtype, width, rows)]
        if index_dtype is not None:
            fields.append(_field("indices", index_dtype, width))
            arrays.append(_arrow_column(b"".join(b.indices or b"" for b in blocks), index_dtype, width, rows))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        row_bytes = max(1, width * (_ITEM[dtype] + (_ITEM[index_dtype] if index_dtype else 0)))
        group = max(MIN_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes)
        name = uuid.uuid4().hex
        layer_folder = STAGED if layer_id is None else f"layer={int(layer_id)}"
        folder = f"run={'0' if run_id is None else int(run_id)}/{layer_folder}"
        rel, tmp = f"{folder}/part-{name}.parquet", f"{folder}/.part-{name}.parquet.tmp"
        try:
            self.fs.makedirs(self._full(folder), exist_ok=True)
            options = {"row_group_size": group, "compression": "none", "use_dictionary": False,
                       "write_statistics": ["seq_id"]}
            if self.local:
                pq.write_table(table, self._full(tmp), **options)
                os.replace(self._full(tmp), self._full(rel))
            else:
                with self.fs.open(self._full(tmp), "wb") as handle:
                    pq.write_table(table, handle, **options)
                self.fs.mv(self._full(tmp), self._full(rel))
            size = int(self.fs.size(self._full(rel)))
        except OSError as exc:
            raise ShardError(f"cannot write a shard under {self.recorded!r}: {exc}; check that the shard root "
                             "exists and is writable") from exc
        return rel, size, firsts[:-1].tolist()

    def place(self, rel: str, layer_id: int, n_bytes: int) -> str:
        """The path of a file written elsewhere (by a collection worker) once it is in ``layer_id``'s
        folder: a staged file is moved there. Raises :class:`ShardError` when the file is not here
        with ``n_bytes`` bytes, or lies in another layer's folder."""
        match = PART.match(rel)
        if match is None or match.group(3).startswith("."):
            raise ShardError(f"{rel!r} is not the path of a finished shard file (run=<id>/layer=<id>/part-<uuid>"
                             ".parquet); a worker's manifest must name the files it wrote")
        run, folder, name = match.groups()
        target = f"run={run}/layer={int(layer_id)}/{name}"
        if folder != STAGED and rel != target:
            raise ShardError(f"shard {rel!r} was written for another layer than the one it is committed to "
                             f"(layer id {layer_id}); the worker was told a stale layer id: run the collection again")
        try:
            size = int(self.fs.size(self._full(rel)))
        except OSError as exc:
            raise ShardError(f"a worker wrote shard {rel!r}, which is not under {self.recorded!r} as this process "
                             f"sees it ({exc}); workers on other machines need a shard root they share (an fsspec "
                             "URL or a folder mounted at the same path), or the driver must write (ReturnRecords)"
                             ) from exc
        if size != n_bytes:
            raise ShardError(f"shard {rel!r} under {self.recorded!r} has {size} bytes; the worker that wrote it "
                             f"reported {n_bytes}: another file took its place. Run the collection again")
        if folder == STAGED:
            try:
                self.fs.makedirs(self._full(f"run={run}/layer={int(layer_id)}"), exist_ok=True)
                if self.local:
                    os.replace(self._full(rel), self._full(target))
                else:
                    self.fs.mv(self._full(rel), self._full(target))
            except OSError as exc:
                raise ShardError(f"cannot move staged shard {rel!r} to {target!r} under {self.recorded!r}: {exc}; "
                                 "check that the shard root is writable") from exc
        return target

    # ------------------------------------------------------------------ reading
    def _file(self, rel: str) -> tuple[Any, np.ndarray]:
        """An open file with the first row of each row group (and the total at the end)."""
        if rel in self._files:
            self._files.move_to_end(rel)
            return self._files[rel]
        import pyarrow.parquet as pq

        try:
            handle = (pq.ParquetFile(self._full(rel), memory_map=True) if self.local
                      else pq.ParquetFile(self.fs.open(self._full(rel), "rb")))
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for damaged files
            raise ShardError(f"activation shard {rel!r} under {self.recorded!r} cannot be read ({exc}); the "
                             "store's shard folder must travel with it (restore it, or recollect the layer)") from exc
        meta = handle.metadata
        starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._files[rel] = (handle, starts)
        if len(self._files) > OPEN_FILES:
            _, (old, _) = self._files.popitem(last=False)
            old.close()
        return handle, starts

    def _group(self, rel: str, index: int) -> dict[str, np.ndarray]:
        key = (rel, index)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        handle, _ = self._file(rel)
        names = [n for n in ("values", "indices") if n in handle.schema_arrow.names]
        table = handle.read_row_group(index, columns=names)
        out = {n: _column_bytes(table.column(n)) for n in names}
        self._groups[key] = out
        if len(self._groups) > CACHED_GROUPS:
            self._groups.popitem(last=False)
        return out

    def read(self, rel: str, first: int, n: int) -> tuple[bytes | memoryview, bytes | memoryview | None]:
        """The value bytes and index bytes (None for dense) of rows ``first .. first + n`` (a view
        into the cached row group where the rows lie in one)."""
        _, starts = self._file(rel)
        if first < 0 or first + n > starts[-1]:
            raise ShardError(f"activation shard {rel!r} holds {int(starts[-1])} rows; the catalog asks for rows "
                             f"{first}..{first + n}: the file was replaced or damaged")
        lo = int(np.searchsorted(starts, first, side="right")) - 1
        parts: dict[str, list[np.ndarray]] = {}
        group = lo
        while n > 0 and group < len(starts) - 1:
            start = int(starts[group])
            cols = self._group(rel, group)
            take = slice(max(first, start) - start, min(first + n, int(starts[group + 1])) - start)
            for name, col in cols.items():
                parts.setdefault(name, []).append(col[take])
            group += 1
            if starts[group] >= first + n:
                break
        return _joined(parts.get("values", [])), (_joined(parts["indices"]) if "indices" in parts else None)

    # ------------------------------------------------------------------ listing and deleting
    def files(self) -> list[str]:
        """Relative paths of every shard or temporary shard file under the root."""
        try:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root)
        except OSError:
            return []
        prefix = self.root.rstrip("/") + "/"
        rels = [str(p).removeprefix(prefix) for p in found]
        return sorted(r for r in rels if PART.match(r))

    @staticmethod
    def run_of(rel: str) -> int | None:
        match = PART.match(rel)
        return int(match.group(1)) if match else None

    def delete(self, rels: list[str]) -> int:
        """Delete files (already unreferenced by the catalog); returns how many went."""
        gone = 0
        for rel in rels:
            for key in [k for k in self._groups if k[0] == rel]:
                del self._groups[key]
            if rel in self._files:
                self._files.pop(rel)[0].close()
            try:
                self.fs.rm(self._full(rel))
                gone += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not delete activation shard %s under %s: %s", rel, self.recorded, exc)
        return gone

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()
        self._groups.clear()
