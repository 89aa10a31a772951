"""SAELens activation caches, both ways: :func:`export_saelens_cache` writes stored layers as the
directory SAELens's ``CacheActivationsRunner`` writes (and its training reads with
``use_cached_activations=True``), :func:`import_saelens_cache` reads one into a store. The layout
(:mod:`.cache_format`) is spoken with pyarrow alone; values travel bit for bit (float16 stays
float16), token ids as int32.

Every row of a cache holds ``context_size`` positions. A store's sequences may differ in length:
the export writes only sequences of exactly ``context_size`` positions (``truncate=True`` also cuts
longer ones to their first ``context_size``) and refuses, saying how many of each length there are,
when no ``context_size`` is given and the lengths differ. Nothing is ever padded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from jaxtyping import Float

from interlatent import naming
from interlatent.analysis.interop.cache_format import (
    CACHE_DTYPES,
    READ_DTYPES,
    RUNNER_CFG,
    TOKEN_IDS_COLUMN,
    CacheColumn,
    SAELensCache,
    array2d,
    arrow_schema,
    cache_features,
    info_json,
    iter_rows,
    read_json,
    read_saelens_cache,
    state_json,
)
from interlatent.db import codec
from interlatent.db.records import SequenceRecord
from interlatent.errors import (
    ConfigError,
    DtypeRangeError,
    NotEnoughDataError,
    OutputError,
    ShapeError,
)

log = logging.getLogger(__name__)

_BATCH_ROWS = 1000  # rows per Arrow record batch at most, as datasets writes them
_BATCH_BYTES = 64 * 2**20  # and about this many bytes: memory holds one batch


@dataclass(frozen=True)
class CacheImport:
    """What :func:`import_saelens_cache` wrote: its run, hook -> layer, and the new prompt indices."""

    run_id: int
    layers: dict[str, str]
    prompt_indices: list[int]
    n_tokens: int


def _export_layers(db: Any, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        found = [n for n in db.layers() if db.layer_info(n).kind == "model" and db.layer_info(n).storage == "dense"]
        if not found:
            raise NotEnoughDataError(f"the store holds no dense model layers to export (it holds {db.layers()}); "
                                     "collect some first or name the layers with layers=[...]")
        return found
    if isinstance(layers, str):
        layers = [layers]
    names = [db.resolve_layer(n) for n in layers]
    if len(set(names)) != len(names):
        raise ConfigError(f"layers names a stored layer twice ({list(layers)} -> {names}); name each once")
    return names


def _column(info: Any, dtype: str | None) -> CacheColumn:
    hook = info.hook_name or naming.tl_hook_name(info.name) or info.name
    if dtype is None:
        dtype = "float32" if info.dtype == "bfloat16" else info.dtype  # bfloat16 widens to float32 exactly
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"a SAELens cache holds {list(CACHE_DTYPES)} values, got dtype={dtype!r}; bfloat16 "
                          "layers export exactly as float32")
    return CacheColumn(hook, int(info.width), dtype)


def _export_prompts(db: Any, names: list[str], prompt_indices: Sequence[int] | None) -> list[int]:
    held = [set(db.prompt_indices(n)) for n in names]
    if prompt_indices is None:
        wanted = sorted(set.union(*held))
    else:
        wanted = sorted({int(i) for i in prompt_indices})
    for name, have in zip(names, held):
        missing = [i for i in wanted if i not in have]
        if missing:
            every = sorted(set.intersection(*held))
            raise ConfigError(f"layer {name!r} is not stored for prompts {missing[:10]}{' …' if len(missing) > 10 else ''}"
                              f"; a cache row holds every hook: pass prompt_indices= prompts all of {names} hold "
                              f"({len(every)} do)")
    return wanted


def _lengths(db: Any, prompts: list[int]) -> dict[int, int]:
    seqs = db.sequences()
    lengths = dict(zip(seqs["prompt_index"].astype(int), seqs["n_positions"].astype(int)))
    return {i: lengths[i] for i in prompts}


def _choose_rows(lengths: dict[int, int], context_size: int | None, truncate: bool) -> tuple[list[int], int]:
    counts: dict[int, int] = {}
    for n in lengths.values():
        counts[n] = counts.get(n, 0) + 1
    shown = ", ".join(f"{c} of {n} positions" for n, c in sorted(counts.items()))
    if context_size is None:
        if len(counts) > 1:
            common = max(counts, key=lambda n: (counts[n], n))
            raise ShapeError(f"a SAELens cache holds sequences of one length (context_size); the prompts have "
                             f"{shown}: pass context_size=N to export those of exactly N positions (e.g. "
                             f"context_size={common}), truncate=True to also cut longer ones to their first N, "
                             "or prompt_indices= to choose")
        context_size = next(iter(counts))
    if context_size < 1:
        raise ConfigError(f"context_size must be >= 1, got {context_size}")
    keep = [i for i, n in lengths.items() if n == context_size or (truncate and n > context_size)]
    if not keep:
        raise NotEnoughDataError(f"no prompt has {'at least' if truncate else 'exactly'} {context_size} positions "
                                 f"(they have {shown}); pick another context_size")
    if len(keep) < len(lengths):
        log.info("export_saelens_cache: %d of %d prompts left out (not %d positions long; they have %s)",
                 len(lengths) - len(keep), len(lengths), context_size, shown)
    return keep, context_size


def _cast(block: Float[np.ndarray, "pos d"], dtype: str, name: str, index: int) -> np.ndarray:
    if dtype == "float16" and not codec.fits_float16(block):
        raise DtypeRangeError(f"layer {name!r}, prompt {index}: values beyond float16's range "
                              f"(+-{codec.FLOAT16_MAX:g}); export it with dtype='float32'")
    return block.astype(READ_DTYPES[dtype], copy=False)


def _layer_blocks(db: Any, names: list[str], prompts: list[int], chunk: int) -> Iterator[list[np.ndarray]]:
    """Each prompt's ``[positions, d]`` float32 block of every layer, in the order of ``prompts``:
    one pass over each layer when ``prompts`` is sorted, else ``chunk`` prompts at a time."""
    if prompts == sorted(prompts):
        streams = [db.iter_sequence_blocks(n, prompt_indices=prompts) for n in names]
        for want, parts in zip(prompts, zip(*streams)):
            if any(i != want for i, _ in parts):
                raise ShapeError(f"layers {names} are not stored for the same prompts; collect them together")
            yield [block for _, block in parts]
        return
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        found = [dict(db.iter_sequence_blocks(n, prompt_indices=part)) for n in names]
        for i in part:
            yield [blocks[i] for blocks in found]


def _batch(db: Any, names: list[str], columns: list[CacheColumn], prompts: list[int], blocks: Iterator[list],
           ctx: int) -> pa.RecordBatch:
    """The next ``len(prompts)`` rows of ``blocks`` (and the prompts' token ids) as one record batch."""
    rows = [next(blocks) for _ in prompts]
    arrays = [np.stack([_cast(row[j][:ctx], col.dtype, name, i) for row, i in zip(rows, prompts)])
              for j, (name, col) in enumerate(zip(names, columns))]
    tokens = db.tokens(prompt_index=prompts, metrics=False)
    ids = {int(i): group["token_id"].to_numpy()[:ctx] for i, group in tokens.groupby("prompt_index", sort=False)}
    token_ids = np.stack([ids[i] for i in prompts]).astype(np.int32)  # the store keeps them as int32
    return pa.record_batch([*(array2d(a) for a in arrays),
                            pa.FixedSizeListArray.from_arrays(pa.array(token_ids.reshape(-1)), ctx)],
                           schema=arrow_schema(columns, ctx))


def _fresh_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} is a file; a SAELens cache is a directory: pass a new path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{str(out)!r} is not empty; pass a new directory or overwrite=True to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished cache ``tmp`` to ``out`` (replacing what was there) without a half state."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_saelens_cache(
    db: Any,
    out_dir: str | Path,
    *,
    layers: Sequence[str] | None = None,
    prompt_indices: Sequence[int] | None = None,
    context_size: int | None = None,
    truncate: bool = False,
    dtype: str | None = None,
    shuffle: bool = False,
    seed: int = 42,
    max_shard_size: int = 500_000_000,
    overwrite: bool = False,
) -> SAELensCache:
    """Write stored layers as a SAELens activation cache in ``out_dir`` (the layout of
    ``CacheActivationsRunner``, one ``Array2D`` column per hook and ``token_ids``; see the module
    docstring). SAELens trains on it with ``use_cached_activations=True`` and
    ``cached_activations_path=out_dir``, ``hook_name`` one of the columns, ``context_size`` and
    ``d_in`` as written.

    Args:
        db: the store (a :class:`~interlatent.db.LatentDB`).
        out_dir: a new or empty directory (``overwrite=True`` replaces a cache there); the cache is
            written beside it and moved in when whole.
        layers: stored layers to write, one column each, named by the TransformerLens hook recorded
            for the layer (``llm.layer.1`` -> ``blocks.1.hook_resid_post``); default: every dense
            model layer. Every exported prompt must hold every layer.
        prompt_indices: the prompts to write (default: all that hold the layers), in prompt order.
            Rows keep that order (``shuffle`` apart); importing the cache keeps it too.
        context_size: positions per row. Sequences of exactly that many positions are written and
            others left out (logged); by default all sequences must have one length, else
            :class:`ShapeError` says which lengths there are. Nothing is padded.
        truncate: also write longer sequences, cut to their first ``context_size`` positions (as
            SAELens cuts a pretokenized dataset's rows).
        dtype: ``"float16"`` or ``"float32"`` for every column; default each layer's storage dtype
            (bfloat16 widens to float32, exactly). A float32 value beyond float16's range raises
            :class:`DtypeRangeError`, never clips.
        shuffle: write the rows in a random order drawn from ``seed`` (SAELens reads caches in order).
        max_shard_size: bytes per ``.arrow`` file, roughly (SAELens keeps shards under 2 GB).
        overwrite: replace a non-empty ``out_dir``.

    Returns the :class:`SAELensCache` written.
    """
    names = _export_layers(db, layers)
    columns = [_column(db.layer_info(n), dtype) for n in names]
    hooks = [c.hook_name for c in columns]
    if len(set(hooks)) != len(hooks) or TOKEN_IDS_COLUMN in hooks:
        raise ConfigError(f"layers {names} would write the columns {hooks}; each column name must be unique and "
                          f"not {TOKEN_IDS_COLUMN!r}: export them to separate caches")
    out = Path(out_dir)
    _fresh_dir(out, overwrite)
    prompts, ctx = _choose_rows(_lengths(db, _export_prompts(db, names, prompt_indices)), context_size, truncate)
    if shuffle:
        prompts = [prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))]
    row_bytes = ctx * (4 + sum(c.d_in * np.dtype(READ_DTYPES[c.dtype]).itemsize for c in columns))
    per_file = max(1, min(max_shard_size // row_bytes, (2**31 - 1) // (ctx * max(c.d_in for c in columns))))
    per_batch = max(1, min(_BATCH_ROWS, _BATCH_BYTES // row_bytes))
    n_files = -(-len(prompts) // per_file)
    files = [f"data-{i:05d}-of-{n_files:05d}.arrow" for i in range(n_files)]
    schema = arrow_schema(columns, ctx)
    digest = hashlib.blake2b(schema.metadata[b"huggingface"], digest_size=8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write a cache beside {str(out)!r}: {exc}; pass a writable directory") from exc
    blocks = _layer_blocks(db, names, prompts, per_batch)
    try:
        for k, name in enumerate(files):
            part = prompts[k * per_file:(k + 1) * per_file]
            with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for start in range(0, len(part), per_batch):
                    batch = _batch(db, names, columns, part[start:start + per_batch], blocks, ctx)
                    for column in batch.columns:
                        for buffer in column.buffers():
                            if buffer is not None:
                                digest.update(buffer)
                    writer.write_batch(batch)
        (tmp / "dataset_info.json").write_text(info_json(cache_features(columns, ctx)))
        (tmp / "state.json").write_text(state_json(files, digest.hexdigest()))
        _publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write the cache to {str(out)!r}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export_saelens_cache: %d sequences x %d positions of %s -> %s", len(prompts), ctx, hooks, out)
    return SAELensCache(out, ctx, len(prompts), tuple(columns), True, tuple(files))


def _targets(cache: SAELensCache, layers: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    if layers is None:
        chosen = {h: naming.canonical_hook_name(h) for h in cache.hook_names}
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        chosen = {h: naming.canonical_hook_name(h) for h in ([layers] if isinstance(layers, str) else layers)}
    for hook in chosen:
        cache.column(hook)  # raises with the closest hook names
    names = list(chosen.values())
    if len(set(names)) != len(names):
        raise ConfigError(f"two hooks would become one layer ({chosen}); map each hook to its own layer name")
    return chosen


def _token_texts(tokenizer: Any) -> Any:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        from interlatent.llm.loading import load_local_tokenizer

        tokenizer = load_local_tokenizer(tokenizer)
    if getattr(tokenizer, "tokenizer", None) is not None:  # a model carrying its tokenizer
        tokenizer = tokenizer.tokenizer
    from interlatent.llm.prompts import TokenText

    return tokenizer, TokenText(tokenizer)


def import_saelens_cache(
    cache_dir: str | Path,
    db: Any,
    *,
    layers: Mapping[str, str] | Sequence[str] | None = None,
    dtype: str | None = None,
    tokenizer: Any = None,
    model_name: str | None = None,
    batch_size: int = 64,
) -> CacheImport:
    """Read a SAELens activation cache (written by ``CacheActivationsRunner`` or
    :func:`export_saelens_cache`) into ``db``, one run of kind ``import``.

    Each cache row becomes a new sequence (the next free prompt indices, in row order) with its
    token ids and, per chosen hook, a ``[context_size, d_in]`` layer block, values bit for bit.

    Args:
        layers: the hooks to read: None (every column), a list of hook names, or a mapping hook ->
            layer name. Hook names become the store's names for them (``blocks.1.hook_resid_post``
            -> ``llm.layer.1``; others keep the hook name) and are recorded as the layers'
            ``hook_name``. A hook the cache lacks raises :class:`LayerNotFoundError`; a layer stored
            already with another width raises :class:`ShapeError` before anything is written.
        dtype: storage dtype of the imported layers (``float16``/``float32``/``bfloat16``); default
            the column's own (float16 or float32; a float64 column needs an explicit dtype). A layer
            the store holds already keeps its own dtype (a warning says when that converts).
        tokenizer: a tokenizer (or a model with ``.tokenizer``, or a local tokenizer directory) to
            decode token texts and the sequence text; without one, texts are empty and the sequence
            text None, the ids kept. A cache without ``token_ids`` (older SAELens) stores id -1.
        model_name: recorded as the run's model and the layers' ``model`` (default: the
            ``model_name`` of a ``cache_activations_runner_cfg.json`` in the directory).
        batch_size: rows per store transaction.
    """
    cache = read_saelens_cache(cache_dir)
    chosen = _targets(cache, layers)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dtypes: dict[str, str] = {}
    stored = set(db.layers())
    for hook, layer in chosen.items():
        col = cache.column(hook)
        if dtype is None and col.dtype not in CACHE_DTYPES:
            raise ConfigError(f"column {hook!r} holds {col.dtype} values, which the store does not keep; pass "
                              "dtype='float32' (or 'float16' / 'bfloat16')")
        dtypes[layer] = codec.check_dtype(dtype or col.dtype)
        if layer in stored and db.layer_info(layer).width != col.d_in:
            raise ShapeError(f"layer {layer!r} is stored with width {db.layer_info(layer).width}, the cache's "
                             f"{hook!r} has d_in {col.d_in}; import it under another name: layers={{{hook!r}: "
                             f"'{layer}.imported'}}")
        if layer in stored and db.layer_info(layer).dtype != dtypes[layer]:
            log.warning("import_saelens_cache: layer %r is stored as %s; the cache's %s values of %r are stored "
                        "as that", layer, db.layer_info(layer).dtype, dtypes[layer], hook)
    runner_cfg = read_json(cache.path / RUNNER_CFG) if (cache.path / RUNNER_CFG).is_file() else {}
    model_name = model_name or runner_cfg.get("model_name")
    if not cache.has_token_ids:
        log.warning("import_saelens_cache: %s has no token_ids column; token ids are stored as -1", cache.path)
    decode = _token_texts(tokenizer)
    meta = {layer: {"hook_name": hook, **({"model": model_name} if model_name else {}),
                    "imported": {"format": "saelens_cache", "path": str(cache.path.resolve()), "column": hook}}
            for hook, layer in chosen.items()}
    config = {"format": "saelens_cache", "path": str(cache.path.resolve()), "layers": chosen,
              "context_size": cache.context_size, "n_prompts": cache.n_sequences,
              "token_texts": decode is not None, "runner_cfg": runner_cfg}
    written: list[int] = []
    hooks = list(chosen)
    with db.run(kind="import", model=model_name, config=config) as run:
        for blocks, ids in iter_rows(cache, hooks, rows=batch_size):
            n = blocks[0].shape[0]
            if ids is None:
                ids = np.full((n, cache.context_size), -1, dtype=np.int64)
            records = []
            for r in range(n):
                row_ids = ids[r].tolist()
                texts = decode[1](row_ids) if decode and cache.has_token_ids else [""] * cache.context_size
                text = decode[0].decode(row_ids) if decode and cache.has_token_ids else None
                records.append(SequenceRecord(token_ids=ids[r], tokens=texts, text=text,
                                              context={"cache_row": len(written) + r},
                                              activations={chosen[h]: b[r] for h, b in zip(hooks, blocks)}))
            written += run.write(records, dtypes=dtypes, layer_meta=meta)
    log.info("import_saelens_cache: %d rows of %s from %s", len(written), hooks, cache.path)
    return CacheImport(run.run_id, chosen, written, len(written) * cache.context_size)


__all__ = ["CacheImport", "export_saelens_cache", "import_saelens_cache"]
