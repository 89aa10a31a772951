"""What a writer hands the store: one :class:`SequenceRecord` per prompt or episode.

A record carries the sequence (text or episode, label, context, once each), its positions (token id
and text, or a Gym step), per-position numeric metrics, and per layer a ``[positions, channels]``
activation matrix — dense, or :class:`SparseActs` for TopK latents — or, for a parquet-tier store,
a :class:`WrittenBlock`: a block another process already wrote to one of the store's shard files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from interlatent.errors import ShapeError


@dataclass
class SparseActs:
    """Sparse latent activations: at each position the ``k`` active latents and their values."""

    indices: np.ndarray  # int [positions, k]
    values: np.ndarray  # float [positions, k]
    width: int  # dictionary size

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices)
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.indices.shape != self.values.shape or self.indices.ndim != 2:
            raise ShapeError(
                "SparseActs needs indices and values of one shape [positions, k]; got "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.width):
            raise ShapeError(f"SparseActs indices must lie in [0, {self.width}); got "
                             f"[{self.indices.min()}, {self.indices.max()}]")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indices.shape[0], self.width)

    def to_dense(self) -> np.ndarray:
        """The ``[positions, width]`` float32 matrix (zeros where no latent is active)."""
        return scatter_dense(self.indices, self.values, self.width)


def scatter_dense(indices: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((indices.shape[0], width), dtype=np.float32)
    if indices.size:
        np.put_along_axis(out, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return out


@dataclass(frozen=True)
class WrittenBlock:
    """A sequence's block of one layer that a worker already encoded and wrote to a shard file of
    the store (see :class:`~interlatent.db.shardwriter.ShardWriter`): what its catalog row needs."""

    path: str  # the shard file, relative to the store's shard root
    first_row: int  # the block's first row in that file
    n_positions: int
    dtype: str  # the rows' dtype (float32 where a float16 layer's block was promoted)
    k: int | None  # sparse: active latents per position; None for dense
    index_dtype: str | None
    width: int  # the layer's width (the dictionary size of a sparse layer)
    layer_dtype: str  # the layer dtype the block was encoded for
    file_rows: int  # rows and bytes of the whole file, for its ``shards`` row
    file_bytes: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_positions, self.width)

    @property
    def sparse(self) -> bool:
        return self.k is not None


@dataclass
class SequenceRecord:
    """One prompt (LLM) or episode (Gym) with its positions and activations.

    Fields:
        token_ids: the token id (or step number) at each position, length ``positions``.
        tokens: decoded token text (or a short step description) at each position.
        activations: layer name -> ``[positions, channels]`` array, :class:`SparseActs`, or a
            :class:`WrittenBlock` already in the store's shards.
        text: the prompt text (None for episodes).
        label: the sequence label (str, int, float or None).
        context: JSON-serialisable prompt-level context, stored once per sequence.
        prompt_index: the sequence's index; None lets the store choose (``index_hint`` when that
            index is free, else the next free one).
        index_hint: the index preferred when ``prompt_index`` is None (a writer's plan, e.g. the
            prompt's position in its list); the store checks it is free inside the write.
        metrics: metric name -> ``[positions]`` numeric array (NaN where undefined).
        positions: position of each row (defaults to 0..positions-1).
        generated: bool per position, True for tokens produced by generation.
        token_context: optional JSON-serialisable dict per position (e.g. observation, action).
        kind: "prompt" or "episode".
    """

    token_ids: Any
    tokens: list[str]
    activations: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    label: Any = None
    context: dict[str, Any] = field(default_factory=dict)
    prompt_index: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    positions: Any = None
    generated: Any = None
    token_context: list[dict[str, Any]] | None = None
    kind: str = "prompt"
    index_hint: int | None = None

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        n = self.n_positions
        if len(self.token_ids) != n:
            raise ShapeError(f"token_ids has {len(self.token_ids)} entries but tokens has {n}")
        for name, acts in self.activations.items():
            shaped = isinstance(acts, (SparseActs, WrittenBlock))
            rows = acts.shape[0] if shaped else np.shape(acts)[0]
            if rows != n or (not shaped and np.ndim(acts) != 2):
                got = acts.values if isinstance(acts, SparseActs) else acts
                raise ShapeError(
                    f"activations for layer {name!r} must be [positions={n}, channels]; "
                    f"got shape {got.shape if isinstance(got, WrittenBlock) else tuple(np.shape(got))}"
                )
        for name, values in self.metrics.items():
            if np.shape(values) != (n,):
                raise ShapeError(f"metric {name!r} must have one value per position ({n}); "
                                 f"got shape {np.shape(values)}")
        for name, values in (("positions", self.positions), ("generated", self.generated)):
            if values is not None and len(values) != n:
                raise ShapeError(f"{name} must have one entry per position ({n}); got {len(values)}")
        if self.token_context is not None and len(self.token_context) != n:
            raise ShapeError(f"token_context must have one dict per position ({n}); "
                             f"got {len(self.token_context)}")
