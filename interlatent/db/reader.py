"""Reading: sequences, tokens and activations, as DataFrames or streamed numpy arrays.

Rows travel as named tuples (:class:`TokenRow`, :class:`ActivationRow`, :class:`LayerRow`); long
``IN`` lists go through :func:`interlatent.db.columns.in_chunks`, and a sequence's stored positions
are decoded by :meth:`TokenRow.position_array` only. Shuffled streaming uses
:mod:`interlatent.db.shuffle`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from interlatent.db import codec
from interlatent.db.columns import (SQL_VARS, decode_json, decoded, dumps, in_chunks, like_pattern, marks, pd,
                                    token_contains, token_like_pattern)
from interlatent.db.layers import LayerInfo
from interlatent.db.records import scatter_dense
from interlatent.db.shuffle import fast_forward, rechunk
from interlatent.db.tier import Tiers
from interlatent.errors import ConfigError, ShapeError


_FEW_PROMPTS = 32_768  # a layer's rows of at most this many prompts are looked up by prompt index


class Activations(NamedTuple):
    """Activations of one layer: ``values`` is ``[tokens, channels]`` float32, ``tokens`` its rows."""

    values: np.ndarray
    tokens: pd.DataFrame
    channels: np.ndarray


class TokenRow(NamedTuple):
    """A sequence's ``tokens`` row with the sequence fields readers need (BLOB and JSON columns raw)."""

    seq_id: int
    prompt_index: int
    label: str | None  # JSON
    n_positions: int
    token_ids: bytes  # int32 [positions]
    tokens: str  # JSON list of token texts
    positions: bytes | None  # int32 [positions]; NULL means 0..positions-1
    generated: bytes | None  # uint8 [positions]; NULL means none generated

    def position_array(self) -> np.ndarray:
        """The stored position of each row, int64 ``[positions]``."""
        if self.positions is None:
            return np.arange(self.n_positions, dtype=np.int64)
        return np.frombuffer(self.positions, dtype="<i4").astype(np.int64)

    def token_id_array(self) -> np.ndarray:
        """The token id (or step) of each row, int64 ``[positions]``."""
        return np.frombuffer(self.token_ids, dtype="<i4").astype(np.int64)

    def generated_array(self) -> np.ndarray:
        """True at each row produced by generation, bool ``[positions]``."""
        if self.generated is None:
            return np.zeros(self.n_positions, dtype=bool)
        return np.frombuffer(self.generated, dtype=np.uint8).astype(bool)

    def token_texts(self) -> list[str]:
        return decode_json(self.tokens, [])

    def label_value(self) -> Any:
        return decode_json(self.label)


class ActivationRow(NamedTuple):
    """One ``activations`` row: a sequence's ``[positions, channels]`` block of one layer, encoded."""

    seq_id: int
    n_positions: int
    dtype: str
    k: int | None  # active latents per position of a sparse layer; None for dense
    index_dtype: str | None
    data: bytes  # empty for a row whose block lives in a shard (see Tiers._with_block)
    indices: bytes | None
    shard_id: int | None = None  # the parquet tier: the shard holding the block, and its first row there
    shard_row: int | None = None

    def decode(self, width: int, channels: np.ndarray | None = None) -> np.ndarray:
        """The block as float32 ``[positions, channels]`` (every channel, or only ``channels``)."""
        n = self.n_positions
        if self.k is None:
            dense = codec.decode(self.data, self.dtype, (n, width))
            return dense if channels is None else dense[:, channels]
        values = codec.decode(self.data, self.dtype, (n, self.k))
        indices = codec.decode_indices(self.indices, self.index_dtype, (n, self.k))
        if channels is None:
            return scatter_dense(indices, values, width)
        lookup = np.full(width, -1, dtype=np.int64)
        lookup[channels] = np.arange(len(channels))
        cols = lookup[indices]
        out = np.zeros((n, len(channels)), dtype=np.float32)
        rows, slots = np.nonzero(cols >= 0)
        out[rows, cols[rows, slots]] = values[rows, slots]
        return out


class LayerRow(NamedTuple):
    """A sequence that holds a layer: its id, prompt index and number of positions."""

    seq_id: int
    prompt_index: int
    n_positions: int


_TOKEN_COLUMNS = ("t.seq_id, s.prompt_index, s.label, s.n_positions, t.token_ids, t.tokens, t.positions,"
                  " t.generated FROM tokens t JOIN sequences s ON s.seq_id = t.seq_id")
_ACTIVATION_COLUMNS = ("a.seq_id, a.n_positions, a.dtype, a.k, a.index_dtype, a.data, a.indices, a.shard_id,"
                       " a.shard_row FROM activations a")


def _spans(seq_col: np.ndarray) -> dict[int, tuple[int, int]]:
    """``seq_id -> (start, end)`` of each sequence's run of rows in ``seq_col`` (runs are contiguous)."""
    uniq, starts, counts = np.unique(seq_col, return_index=True, return_counts=True)
    return {int(s): (int(a), int(a + n)) for s, a, n in zip(uniq, starts, counts)}


class Reader(Tiers):
    """The part of :class:`~interlatent.db.store.LatentDB` that reads sequences and activations."""

    # ------------------------------------------------------------------ sequences and tokens
    def _seq_filter(self, prompt_index: int | Sequence[int] | None = None, prompt_like: str | None = None,
                    label: Any = None, run_id: int | None = None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if prompt_index is not None:
            indices = [int(prompt_index)] if np.isscalar(prompt_index) else [int(i) for i in prompt_index]
            if not indices:
                clauses.append("0")
            else:
                clauses.append(f"s.prompt_index IN ({marks(len(indices))})")
                params += indices
        if prompt_like is not None:
            clauses.append("s.text LIKE ? ESCAPE '\\'")
            params.append(like_pattern(prompt_like))
        if label is not None:
            clauses.append("(s.label = ? OR s.label = ?)")
            params += [dumps(label), str(label)]
        if run_id is not None:
            clauses.append("s.run_id = ?")
            params.append(int(run_id))
        return (" AND ".join(clauses) if clauses else "1"), params

    def sequences(self, *, prompt_index: int | Sequence[int] | None = None, prompt_like: str | None = None,
                  label: Any = None, run_id: int | None = None) -> pd.DataFrame:
        """One row per prompt/episode: prompt_index, kind, text, label, label_id, n_positions, run_id,
        context (parsed)."""
        where, params = self._seq_filter(prompt_index, prompt_like, label, run_id)
        df = pd.read_sql_query(
            "SELECT s.prompt_index, s.kind, s.text, s.label, s.label_id, s.n_positions, s.run_id, s.context"
            f" FROM sequences s WHERE {where} ORDER BY s.prompt_index",
            self._conn, params=params,
        )
        df["label"] = decoded(df["label"])
        df["context"] = decoded(df["context"], {})
        return df

    def metric_names(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM metrics ORDER BY metric_id")]

    def _seq_ids(self, prompt_index: Any = None, prompt_like: str | None = None, label: Any = None,
                 run_id: int | None = None) -> list[int]:
        where, params = self._seq_filter(prompt_index, prompt_like, label, run_id)
        return [r[0] for r in self._q(f"SELECT s.seq_id FROM sequences s WHERE {where} ORDER BY s.prompt_index",
                                      params)]

    def _token_rows(self, seq_ids: Sequence[int], token_like: str | None = None) -> list[TokenRow]:
        """The token row of each sequence, in the order of ``seq_ids``; with ``token_like``, only
        sequences that may contain it."""
        rows: dict[int, TokenRow] = {}
        for chunk, in_ids in in_chunks(seq_ids):
            sql = f"SELECT {_TOKEN_COLUMNS} WHERE t.seq_id IN ({in_ids})"
            params: list[Any] = list(chunk)
            pattern = None if token_like is None else token_like_pattern(token_like, in_json=True)
            if pattern is not None:
                sql += " AND t.tokens LIKE ? ESCAPE '\\'"
                params.append(pattern)
            for row in self._q(sql, params):
                rows[row[0]] = TokenRow(*row)
        return [rows[s] for s in seq_ids if s in rows]

    def _metric_blobs(self, seq_ids: Sequence[int]) -> Iterator[tuple[int, int, bytes]]:
        """``(seq_id, metric_id, float32 [positions] bytes)`` of every stored metric of the sequences."""
        for chunk, in_ids in in_chunks(seq_ids):
            yield from self._q(f"SELECT seq_id, metric_id, data FROM token_metrics WHERE seq_id IN ({in_ids})",
                               chunk)

    def _token_frame(self, seq_ids: Sequence[int], token_like: str | None = None) -> pd.DataFrame:
        """Token rows of the given sequences (in that order), one DataFrame row per position, with a
        ``row`` column (the position's index in its sequence); with ``token_like``, only sequences
        that may contain it."""
        rows = self._token_rows(seq_ids, token_like)
        lengths = [row.n_positions for row in rows]

        def column(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        texts: list[str] = []
        labels: list[Any] = []
        for row in rows:
            texts += row.token_texts()
            labels += [row.label_value()] * row.n_positions
        df = pd.DataFrame({
            "seq_id": np.repeat(np.array([r.seq_id for r in rows], dtype=np.int64), lengths),
            "prompt_index": np.repeat(np.array([r.prompt_index for r in rows], dtype=np.int64), lengths),
            "row": column([np.arange(n) for n in lengths], np.int64),
            "position": column([r.position_array() for r in rows], np.int64),
            "token_id": column([r.token_id_array() for r in rows], np.int64),
            "token": pd.Series(texts, dtype=object),
            "generated": column([r.generated_array() for r in rows], bool),
            "label": pd.Series(labels, dtype=object),
        })
        return df

    def _metric_columns(self, seq_col: np.ndarray, row_col: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token metric columns aligned with ``(seq_col, row_col)``: each sequence's rows are
        contiguous, ``row_col`` holding the position's index in its sequence. The metrics are those
        stored for these sequences; NaN where a sequence has no value."""
        span_of = _spans(seq_col)
        names = dict(self._q("SELECT metric_id, name FROM metrics"))
        out: dict[str, np.ndarray] = {}
        for seq_id, metric_id, data in self._metric_blobs(list(span_of)):
            col = out.setdefault(names[metric_id], np.full(len(seq_col), np.nan, dtype=np.float32))
            start, end = span_of[seq_id]
            vals = np.frombuffer(data, dtype="<f4")
            rows = row_col[start:end]
            inside = rows < vals.size
            col[start:end][inside] = vals[rows[inside]]
        return dict(sorted(out.items()))

    def _indexed_token_rows(self, token_like: str, seq_ids: Sequence[int]) -> dict[int, np.ndarray] | None:
        """``seq_id -> rows`` of the positions whose token contains ``token_like``, from an index;
        None here: the token lists are read (the token index answers where it is current)."""
        return None

    def _token_selection(self, seq_ids: Sequence[int], token_like: str | None, limit: int | None, metrics: bool
                         ) -> pd.DataFrame:
        """The token rows of ``seq_ids`` (in that order) whose token contains ``token_like``
        (case-insensitively, as :func:`~interlatent.db.columns.token_contains` compares), at most
        ``limit`` of them, with ``seq_id`` and ``row`` columns and the metrics of the sequences kept.
        The rows holding the token come from the token index when it is current (only the sequences
        holding it are read), else from a scan of the token lists: the same rows either way."""
        hits = None if token_like is None else self._indexed_token_rows(token_like, seq_ids)
        if hits is not None:
            meta = self._token_frame([s for s in seq_ids if s in hits])
            keep = np.zeros(len(meta), dtype=bool)
            for sid, (start, end) in _spans(meta["seq_id"].to_numpy()).items():
                rows = hits[sid]
                keep[start + rows[rows < end - start]] = True
        else:
            meta = self._token_frame(seq_ids, token_like)
            keep = np.ones(len(meta), dtype=bool)
            if token_like is not None:
                keep = token_contains(meta["token"].tolist(), token_like)
        if limit is not None:
            keep &= np.cumsum(keep) <= int(limit)
        if not keep.all():
            meta = meta[keep].reset_index(drop=True)
        if metrics and len(meta):
            for name, values in self._metric_columns(meta["seq_id"].to_numpy(), meta["row"].to_numpy()).items():
                meta[name] = values
        return meta

    def tokens(self, *, prompt_index: int | Sequence[int] | None = None, token_like: str | None = None,
               prompt_like: str | None = None, label: Any = None, metrics: bool = True) -> pd.DataFrame:
        """Token metadata (prompt_index, position, token_id, token, generated, label, metrics...)."""
        seq_ids = self._seq_ids(prompt_index, prompt_like, label)
        return self._token_selection(seq_ids, token_like, None, metrics).drop(columns=["seq_id", "row"])

    def matching_prompts(self, *, prompt_like: str | None = None, label: Any = None) -> list[int]:
        """Prompt indices whose text contains ``prompt_like`` and/or whose label is ``label``."""
        where, params = self._seq_filter(None, prompt_like, label)
        return [r[0] for r in self._q(f"SELECT s.prompt_index FROM sequences s WHERE {where} ORDER BY s.prompt_index",
                                      params)]

    def token_lists(self, prompt_indices: Sequence[int], token_like: str | None = None
                    ) -> dict[int, tuple[np.ndarray, list[str], Any]]:
        """``prompt_index -> (positions, token texts, label)`` without building DataFrames; with
        ``token_like``, only prompts that may contain it (check the texts)."""
        where, params = self._seq_filter(list(prompt_indices))
        seq_ids = [r[0] for r in self._q(f"SELECT s.seq_id FROM sequences s WHERE {where}", params)]
        return {int(row.prompt_index): (row.position_array(), row.token_texts(), row.label_value())
                for row in self._token_rows(seq_ids, token_like)}

    # ------------------------------------------------------------------ activations
    def _layer_rows(self, info: LayerInfo, prompt_indices: Sequence[int] | None = None) -> list[LayerRow]:
        """The sequences holding a layer, in prompt order (only ``prompt_indices`` when given)."""
        sql = ("SELECT a.seq_id, s.prompt_index, a.n_positions FROM activations a JOIN sequences s"
               " ON s.seq_id = a.seq_id WHERE a.layer_id=?")
        if prompt_indices is not None and len(prompt_indices) <= _FEW_PROMPTS:  # looked up, not filtered
            rows = [LayerRow(*r) for chunk, in_indices in in_chunks(sorted({int(i) for i in prompt_indices}))
                    for r in self._q(f"{sql} AND s.prompt_index IN ({in_indices})", [info.layer_id, *chunk])]
            return sorted(rows, key=lambda r: r.prompt_index)
        rows = [LayerRow(*r) for r in self._q(f"{sql} ORDER BY s.prompt_index", (info.layer_id,))]
        if prompt_indices is not None:
            allowed = {int(i) for i in prompt_indices}
            rows = [r for r in rows if r.prompt_index in allowed]
        return rows

    def _iter_layer_rows(self, info: LayerInfo, seq_ids: Sequence[int] | None,
                         channels: np.ndarray | None) -> Iterator[tuple[int, np.ndarray]]:
        """(seq_id, [positions, channels]) for the layer, in prompt order (or ``seq_ids`` order)."""
        if seq_ids is None:
            cur = self._conn.execute(f"SELECT {_ACTIVATION_COLUMNS} JOIN sequences s ON s.seq_id = a.seq_id"
                                     " WHERE a.layer_id=? ORDER BY s.prompt_index", (info.layer_id,))
            for row in map(ActivationRow._make, cur):
                yield row.seq_id, self._with_block(row).decode(info.width, channels)
            return
        for chunk, in_ids in in_chunks(seq_ids):
            rows = {r[0]: ActivationRow(*r) for r in self._q(
                f"SELECT {_ACTIVATION_COLUMNS} WHERE a.layer_id=? AND a.seq_id IN ({in_ids})", [info.layer_id, *chunk])}
            for window in self._read_windows([s for s in chunk if s in rows], rows, info.width):
                for sid in window:
                    yield sid, self._with_block(rows.pop(sid)).decode(info.width, channels)

    def _channels(self, info: LayerInfo, channels: Sequence[int] | int | None) -> np.ndarray | None:
        if channels is None:
            return None
        arr = np.atleast_1d(np.asarray(channels, dtype=np.int64))
        bad = arr[(arr < 0) | (arr >= info.width)]
        if bad.size:
            raise ConfigError(f"layer {info.name!r} has channels 0..{info.width - 1}; got {bad.tolist()}")
        return arr

    def prompt_indices(self, layer: str | None = None) -> list[int]:
        """Prompt indices stored (those with activations for ``layer`` when given), sorted."""
        if layer is None:
            return [r[0] for r in self._q("SELECT prompt_index FROM sequences ORDER BY prompt_index")]
        return [r.prompt_index for r in self._layer_rows(self.layer_info(layer))]

    def iter_sequence_blocks(self, layer: str, *, prompt_indices: Sequence[int] | None = None,
                             channels: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(prompt_index, [positions, channels] float32)`` for every sequence of a layer, in prompt order."""
        info = self.layer_info(layer)
        chans = self._channels(info, channels)
        rows = self._layer_rows(info, prompt_indices)
        index_of = {r.seq_id: r.prompt_index for r in rows}
        for sid, block in self._iter_layer_rows(info, [r.seq_id for r in rows], chans):
            yield index_of[sid], block

    def iter_sequence_rows(self, layer: str, rows: dict[int, np.ndarray], *, channels: Sequence[int] | None = None
                           ) -> Iterator[tuple[int, np.ndarray]]:
        """``(prompt_index, [len(rows[prompt_index]), channels] float32)``: only the given rows (position
        indices, ascending) of each prompt's block, in prompt order. A dense block stored in SQLite is
        read a row at a time from its BLOB when few of its rows are wanted, so a few rows of a long
        block cost a few rows of I/O; other blocks are decoded whole."""
        info = self.layer_info(layer)
        chans = self._channels(info, channels)
        stored = self._layer_rows(info, list(rows))
        for start in range(0, len(stored), SQL_VARS):
            chunk = stored[start : start + SQL_VARS]
            meta = {int(r[0]): r[1:] for r in self._q(
                f"SELECT seq_id, act_id, dtype, k, shard_id FROM activations WHERE layer_id=? AND seq_id IN"
                f" ({marks(len(chunk))})", [info.layer_id, *(r.seq_id for r in chunk)])}
            for row in chunk:
                want = np.asarray(rows[row.prompt_index], dtype=np.int64)
                act_id, dtype, k, shard_id = meta[row.seq_id]
                if k is None and shard_id is None and 4 * want.size < row.n_positions:
                    stride = info.width * (4 if dtype == "float32" else 2)
                    with self._conn.blobopen("activations", "data", act_id, readonly=True) as blob:
                        parts = []
                        for r in want.tolist():
                            blob.seek(r * stride)
                            parts.append(blob.read(stride))
                    block = codec.decode(b"".join(parts), dtype, (want.size, info.width))
                    yield row.prompt_index, block if chans is None else block[:, chans]
                else:
                    for _, whole in self._iter_layer_rows(info, [row.seq_id], chans):
                        yield row.prompt_index, whole[want]

    def fetch_activations(
        self,
        layer: str,
        *,
        prompt_index: int | Sequence[int] | None = None,
        token_like: str | None = None,
        prompt_like: str | None = None,
        label: Any = None,
        channels: Sequence[int] | int | None = None,
        limit: int | None = None,
        metrics: bool = True,
    ) -> Activations:
        """Activations of ``layer`` as ``(values [tokens, channels] float32, tokens DataFrame, channels)``.

        Filters: ``prompt_index`` (one or several), ``token_like`` (literal substring of the token
        text, compared case-insensitively as ``str.lower`` does; the positions come from the token
        index when it is current), ``prompt_like`` (substring of the prompt text), ``label``;
        ``channels`` selects columns; ``limit`` caps the number of tokens (in prompt order). The
        token frame's metric columns are those stored for the sequences that contribute rows.
        """
        info = self.layer_info(layer)
        chans = self._channels(info, channels)
        where, params = self._seq_filter(prompt_index, prompt_like, label)
        seq_ids = [r[0] for r in self._q(
            "SELECT a.seq_id FROM activations a JOIN sequences s ON s.seq_id = a.seq_id"
            f" WHERE a.layer_id=? AND {where} ORDER BY s.prompt_index", [info.layer_id, *params])]
        meta = self._token_selection(seq_ids, token_like, limit, metrics)
        span_of = _spans(meta["seq_id"].to_numpy())
        row_col = meta["row"].to_numpy()
        blocks = []
        for sid, block in self._iter_layer_rows(info, [s for s in seq_ids if s in span_of], chans):
            rows = row_col[slice(*span_of[sid])]
            blocks.append(block if rows.size == block.shape[0] else block[rows])
        width = info.width if chans is None else len(chans)
        values = np.concatenate(blocks) if blocks else np.zeros((0, width), dtype=np.float32)
        tokens = meta.drop(columns=["seq_id", "row"])
        return Activations(values, tokens, np.arange(info.width) if chans is None else chans)

    def to_pandas(self, layer: str | None = None, *, channels: Sequence[int] | int | None = None,
                  long: bool = False, **filters: Any) -> pd.DataFrame:
        """Tokens as a DataFrame; with ``layer``, one column per channel (``ch{c}``) next to the token
        metadata, or with ``long=True`` one row per (token, channel) with a ``value`` column."""
        if layer is None:
            return self.tokens(**filters)
        acts = self.fetch_activations(layer, channels=channels, **filters)
        if long:
            meta = acts.tokens.loc[acts.tokens.index.repeat(len(acts.channels))].reset_index(drop=True)
            meta["channel"] = np.tile(acts.channels, len(acts.tokens))
            meta["value"] = acts.values.reshape(-1)
            return meta
        cols = pd.DataFrame(acts.values, columns=[f"ch{c}" for c in acts.channels])
        return pd.concat([acts.tokens, cols], axis=1)

    def iter_activations(self, layer: str, **options: Any) -> Iterator[np.ndarray]:
        """Stream ``[<=chunk_size, channels]`` float32 chunks of a layer without loading it whole: the
        values of :meth:`iter_activation_chunks`, which takes the same keyword options."""
        for values, _ in self.iter_activation_chunks(layer, **options):
            yield values

    def iter_activation_chunks(
        self,
        layer: str | Sequence[str],
        *,
        chunk_size: int = 8192,
        shuffle: bool = False,
        seed: int | None = None,
        prompt_indices: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        buffer_tokens: int = 262_144,
        skip_chunks: int = 0,
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Stream a layer as ``(values, row_ids)`` chunks without loading it whole: ``values`` is
        ``[<=chunk_size, channels]`` float32, ``row_ids`` ``[n, 2]`` (prompt_index, position index).
        ``layer`` may be a list of layers stored for the same sequences: then ``values`` is a tuple
        with one array per layer, rows aligned.

        With ``shuffle``, sequences are read in a seeded random order and tokens are shuffled within a
        buffer of ``buffer_tokens`` rows: the stream's memory peaks within twice that buffer
        (``2 x buffer_tokens x channels x 4`` bytes; tested). ``skip_chunks`` starts after that
        many chunks of the same stream, reading only the sequences still needed (those of the
        shuffle buffer it starts in, and the ones after).
        """
        names = [layer] if isinstance(layer, str) else list(layer)
        infos = [self.layer_info(n) for n in names]
        chans = [self._channels(i, channels) for i in infos]
        rows = self._layer_rows(infos[0], prompt_indices)
        rng = np.random.default_rng(seed) if shuffle else None
        if rng is not None:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        of_seq = {r.seq_id: r for r in rows}
        order = [r.seq_id for r in rows]
        piece_limit = max(buffer_tokens if shuffle else chunk_size, 1) // 8
        longest = max((r.n_positions for r in rows), default=0)

        def pieces(seq_ids: list[int]) -> Iterator[list[int]]:
            piece: list[int] = []
            piece_rows = 0
            for sid in seq_ids:
                n = of_seq[sid].n_positions
                if piece and piece_rows + n > piece_limit:
                    yield piece
                    piece, piece_rows = [], 0
                piece.append(sid)
                piece_rows += n
            if piece:
                yield piece

        def read(info: LayerInfo, ch: np.ndarray | None, seq_ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
            for piece in pieces(seq_ids):  # a few sequences at a time: what is read waits beside the buffer
                yield from self._iter_layer_rows(info, piece, ch)

        def blocks(seq_ids: list[int]) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
            for parts in zip(*(read(info, ch, seq_ids) for info, ch in zip(infos, chans))):
                row = of_seq[parts[0][0]]
                if any(sid != row.seq_id for sid, _ in parts):
                    raise ShapeError(f"layers {names} are not stored for the same prompts; collect them together")
                for name, (_, block) in zip(names, parts):
                    if block.shape[0] != row.n_positions:
                        raise ShapeError(f"layer {name!r} has {block.shape[0]} positions for prompt "
                                         f"{row.prompt_index}, expected {row.n_positions}")
                n = row.n_positions
                yield [b for _, b in parts], np.stack([np.full(n, row.prompt_index), np.arange(n)], axis=1)

        start = None
        if skip_chunks > 0:
            pos = fast_forward([r.n_positions for r in rows], chunk_size, skip_chunks, rng=rng,
                               buffer_rows=buffer_tokens)
            need = sorted(set(pos.rows[:, 0].tolist()))
            got = list(blocks([order[i] for i in need]))
            offset = dict(zip(need, np.cumsum([0] + [ids.shape[0] for _, ids in got[:-1]]).tolist()))
            take = np.asarray([offset[b] for b in pos.rows[:, 0].tolist()], dtype=np.int64) + pos.rows[:, 1]
            if got:  # else the stream is used up: nothing is held, nothing comes after
                held = [np.concatenate([arrays[j] for arrays, _ in got])[take] for j in range(len(infos))]
                start = (held, np.concatenate([ids for _, ids in got])[take], pos.ready)
            order = order[pos.next_block:]

        for values, ids in rechunk(blocks(order), chunk_size, rng=rng, buffer_rows=buffer_tokens,
                                   max_block_rows=longest or None, start=start):
            yield (values[0] if len(infos) == 1 else tuple(values)), ids
