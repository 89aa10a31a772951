"""The on-disk layout of a SAELens activation cache, written and read with pyarrow alone (neither
``datasets`` nor SAELens needs to be installed): a Hugging Face ``datasets`` directory as
``Dataset.save_to_disk`` leaves it, which SAELens's ``CacheActivationsRunner`` writes.

=============================  ================================================================
file                           content
=============================  ================================================================
``data-0000i-of-0000n.arrow``  Arrow IPC streams; one row per sequence
``dataset_info.json``          the ``features``: per hook ``Array2D(shape=(context_size, d_in),
                               dtype)`` and ``token_ids`` ``List(Value("int32"), length=context_size)``
``state.json``                 the data files in order, a fingerprint, no format
=============================  ================================================================

An ``Array2D`` column is stored as ``list<list<float>>`` whose field carries the
``datasets.features.features.Array2DExtensionType`` extension name and ``[[context_size, d_in],
dtype]``; the schema's ``huggingface`` metadata repeats the features. The features are written as
``datasets`` 4 and later write them (``List``); the older ``Sequence`` spelling reads too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from jaxtyping import Shaped

from interlatent.errors import ArtifactError, unknown_name

TOKEN_IDS_COLUMN = "token_ids"
ARRAY2D_EXTENSION = "datasets.features.features.Array2DExtensionType"
CACHE_DTYPES = ("float16", "float32")
"""Value dtypes an exported cache is written in (Arrow has no bfloat16; SAELens reads both)."""
RUNNER_CFG = "cache_activations_runner_cfg.json"
READ_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}

@dataclass(frozen=True)
class CacheColumn:
    """One hook's activations in a cache: ``[context_size, d_in]`` per row, stored as ``dtype``."""

    hook_name: str
    d_in: int
    dtype: str


@dataclass(frozen=True)
class SAELensCache:
    """What a SAELens activation cache directory holds (see :func:`read_saelens_cache`)."""

    path: Path
    context_size: int
    n_sequences: int
    columns: tuple[CacheColumn, ...]
    has_token_ids: bool
    files: tuple[str, ...]

    @property
    def hook_names(self) -> list[str]:
        return [c.hook_name for c in self.columns]

    def column(self, hook_name: str) -> CacheColumn:
        for c in self.columns:
            if c.hook_name == hook_name:
                return c
        raise unknown_name("hook in the cache", hook_name, self.hook_names,
                           hint=f"{self.path} holds these hook columns")



def cache_features(columns: Sequence[CacheColumn], context_size: int, token_ids: bool = True) -> dict[str, Any]:
    """The ``datasets`` features of a cache, as ``Features.to_dict()`` writes them (hooks, then
    ``token_ids``), the same dict SAELens's runner builds."""
    out: dict[str, Any] = {c.hook_name: {"shape": [context_size, c.d_in], "dtype": c.dtype, "_type": "Array2D"}
                           for c in columns}
    if token_ids:
        out[TOKEN_IDS_COLUMN] = {"feature": {"dtype": "int32", "_type": "Value"}, "length": context_size,
                                 "_type": "List"}
    return out


def arrow_schema(columns: Sequence[CacheColumn], context_size: int) -> pa.Schema:
    fields = []
    for c in columns:
        storage = pa.list_(pa.list_(_VALUE_TYPES[c.dtype]))
        ext = {"ARROW:extension:name": ARRAY2D_EXTENSION,
               "ARROW:extension:metadata": json.dumps([[context_size, c.d_in], c.dtype])}
        fields.append(pa.field(c.hook_name, storage, metadata=ext))
    fields.append(pa.field(TOKEN_IDS_COLUMN, pa.list_(pa.int32(), context_size)))
    meta = {"huggingface": json.dumps({"info": {"features": cache_features(columns, context_size)}})}
    return pa.schema(fields, metadata=meta)


def array2d(values: Shaped[np.ndarray, "rows ctx d"]) -> pa.Array:
    """``[rows, ctx, d]`` as ``list<list<value>>`` (the ``Array2D`` storage), values not copied."""
    rows, ctx, d = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * ctx * d + 1, d, dtype=np.int32)), flat)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * ctx + 1, ctx, dtype=np.int32)), inner)


def info_json(features: dict[str, Any]) -> str:
    return json.dumps({"citation": "", "description": "", "features": features, "homepage": "", "license": ""},
                      indent=2)


def state_json(files: Sequence[str], fingerprint: str) -> str:
    return json.dumps({"_data_files": [{"filename": f} for f in files], "_fingerprint": fingerprint,
                       "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                       "_output_all_columns": False, "_split": None}, indent=2)



def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); is this a SAELens activation cache?") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _data_files(folder: Path) -> list[str]:
    state = folder / "state.json"
    if state.is_file():
        listed = read_json(state).get("_data_files")
        if not isinstance(listed, list) or not all(isinstance(f, dict) and "filename" in f for f in listed):
            raise ArtifactError(f"{state} has no '_data_files' list of {{'filename': ...}}; is it a dataset saved "
                                "with save_to_disk?")
        files = [str(f["filename"]) for f in listed]
    else:
        files = sorted(p.name for p in folder.glob("data-*.arrow"))
    missing = [f for f in files if not (folder / f).is_file()]
    if not files or missing:
        raise ArtifactError(f"{str(folder)!r} lists data files {missing or files} that are not there; the cache "
                            "is incomplete")
    return files


@contextmanager
def _open(path: Path) -> Iterator[pa.RecordBatchStreamReader]:
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArtifactError(f"{path} is not an Arrow stream as datasets writes ({exc})") from None
        try:
            yield reader
        except (pa.ArrowInvalid, OSError) as exc:  # a truncated or corrupted file, found reading its batches
            raise ArtifactError(f"{path} could not be read to the end ({exc}); the cache is damaged") from None


def _column_of(name: str, spec: Any, field: pa.Field | None, path: Path) -> tuple[int, CacheColumn] | None:
    """``(context_size, column)`` of an ``Array2D`` feature, or None for the token ids."""
    if name == TOKEN_IDS_COLUMN:
        return None
    if field is None:
        raise ArtifactError(f"{path}: dataset_info.json names column {name!r}, the data files do not hold it")
    if not isinstance(spec, dict) or spec.get("_type") != "Array2D":
        raise ArtifactError(f"{path}: column {name!r} is {spec!r}, not an Array2D of [context_size, d_in] "
                            "activations; is this a SAELens activation cache?")
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ArtifactError(f"{path}: column {name!r} has shape {shape!r}, expected [context_size, d_in]")
    if dtype not in READ_DTYPES:
        raise ArtifactError(f"{path}: column {name!r} holds {dtype!r} values; readable: {list(READ_DTYPES)}")
    return shape[0], CacheColumn(name, shape[1], dtype)


def read_saelens_cache(cache_dir: str | Path) -> SAELensCache:
    """Describe the SAELens activation cache in ``cache_dir`` (columns, context size, rows) from its
    ``dataset_info.json``, ``state.json`` and Arrow schemas, reading no activations. Raises
    :class:`ArtifactError` for a missing directory or one that is not such a cache."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        raise ArtifactError(f"{str(folder)!r} does not exist or is not a directory; point at the directory a "
                            "SAELens CacheActivationsRunner (or export_saelens_cache) wrote")
    info_path = folder / "dataset_info.json"
    if not info_path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise ArtifactError(f"{str(folder)!r} is not a SAELens activation cache: expected dataset_info.json, "
                            f"state.json and data-*.arrow, found {found}")
    features = read_json(info_path).get("features")
    if not isinstance(features, dict):
        raise ArtifactError(f"{info_path} has no 'features' object; is this a dataset saved with save_to_disk?")
    files = _data_files(folder)
    with _open(folder / files[0]) as first:
        schema = first.schema
    found_cols = [_column_of(n, spec, schema.field(n) if n in schema.names else None, folder)
                  for n, spec in features.items()]
    columns = [c for c in found_cols if c is not None]
    if not columns:
        raise ArtifactError(f"{info_path} describes no Array2D activation column (features: {list(features)})")
    sizes = {ctx for ctx, _ in columns}
    if len(sizes) != 1:
        raise ArtifactError(f"{folder}: the columns hold different context sizes {sorted(sizes)}")
    if TOKEN_IDS_COLUMN in features and TOKEN_IDS_COLUMN not in schema.names:
        raise ArtifactError(f"{folder}: dataset_info.json names column 'token_ids', the data files do not hold it")
    n_rows = 0
    for name in files:
        with _open(folder / name) as reader:
            if reader.schema.names != schema.names:
                raise ArtifactError(f"{folder / name} has columns {reader.schema.names}, {files[0]} has "
                                    f"{schema.names}")
            n_rows += sum(batch.num_rows for batch in reader)
    return SAELensCache(folder, sizes.pop(), n_rows, tuple(c for _, c in columns), TOKEN_IDS_COLUMN in schema.names,
                        tuple(files))


def _storage(arr: pa.Array) -> pa.Array:
    return arr.storage if isinstance(arr, pa.ExtensionArray) else arr


def _nested(arr: pa.Array, lengths: Sequence[int], value_type: pa.DataType, what: str) -> np.ndarray:
    """The flat values (a copy) of a nested list column whose lists have exactly ``lengths`` at each
    level and whose values are ``value_type``."""
    arr = _storage(arr)
    for n in lengths:
        if not pa.types.is_list(arr.type) and not pa.types.is_fixed_size_list(arr.type) \
                and not pa.types.is_large_list(arr.type):
            raise ArtifactError(f"{what} is {arr.type}, expected nested lists of lengths {list(lengths)}")
        if arr.null_count:
            raise ArtifactError(f"{what} has missing (null) rows")
        got = np.unique(arr.value_lengths().to_numpy(zero_copy_only=False))
        if got.size and (got.size > 1 or int(got[0]) != n):
            raise ArtifactError(f"{what} holds lists of lengths {got.tolist()[:5]}, expected {n}")
        arr = arr.flatten()
    if arr.type != value_type:
        raise ArtifactError(f"{what} holds {arr.type} values, its features say {value_type}")
    if arr.null_count:
        raise ArtifactError(f"{what} has missing (null) values")
    return np.array(arr.to_numpy(zero_copy_only=False), copy=True)


def iter_rows(cache: SAELensCache, hooks: Sequence[str], rows: int = 1000
              ) -> Iterator[tuple[list[np.ndarray], np.ndarray | None]]:
    """``([n, ctx, d] per hook, [n, ctx] token ids or None)`` for ``n <= rows`` rows at a time, in
    the cache's order (a record batch is read in slices, so memory holds ``rows`` rows)."""
    ctx = cache.context_size
    for name in cache.files:
        with _open(cache.path / name) as reader:
            for batch in reader:
                for start in range(0, batch.num_rows, rows):
                    part = batch.slice(start, rows)
                    n = part.num_rows
                    blocks = []
                    for hook in hooks:
                        col = cache.column(hook)
                        values = _nested(part.column(hook), (ctx, col.d_in), _VALUE_TYPES[col.dtype],
                                         f"{name}: column {hook!r}")
                        blocks.append(values.reshape(n, ctx, col.d_in))
                    ids = None
                    if cache.has_token_ids:
                        flat = _nested(part.column(TOKEN_IDS_COLUMN), (ctx,), pa.int32(),
                                       f"{name}: column 'token_ids'")
                        ids = flat.astype(np.int64).reshape(n, ctx)
                    yield blocks, ids


__all__ = ["ARRAY2D_EXTENSION", "CACHE_DTYPES", "READ_DTYPES", "RUNNER_CFG", "TOKEN_IDS_COLUMN", "CacheColumn",
           "SAELensCache", "array2d", "arrow_schema", "cache_features", "info_json", "iter_rows", "read_json",
           "read_saelens_cache", "state_json"]
