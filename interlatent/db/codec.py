"""Arrays <-> BLOBs.

A dense activation block is a ``[positions, channels]`` matrix stored as the raw little-endian bytes
of its storage dtype. ``bfloat16`` has no numpy dtype: it is kept as the upper 16 bits of float32
(rounded to nearest even), which is exactly what torch's bfloat16 holds.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from interlatent.db.records import SparseActs
from interlatent.errors import ConfigError, DtypeRangeError

log = logging.getLogger(__name__)

STORAGE_DTYPES = ("float16", "float32", "bfloat16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype


def fits_float16(values: np.ndarray) -> bool:
    """True when every finite value survives a cast to float16 without overflowing to inf."""
    if values.size == 0 or values.dtype == np.float16:
        return True  # already float16: nothing more can overflow
    peak = max(float(values.max()), -float(values.min()))
    if peak <= FLOAT16_MAX:
        return True
    finite = values[np.isfinite(values)]
    return finite.size == 0 or float(np.abs(finite).max()) <= FLOAT16_MAX


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # round to nearest even on the dropped 16 bits; NaNs keep a quiet-NaN payload
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Encode a float array to bytes in ``dtype``. Raises if float16 would overflow."""
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        if not fits_float16(values):
            peak = float(np.nanmax(np.abs(values[np.isfinite(values)])))
            raise DtypeRangeError(
                f"values up to {peak:.6g} do not fit float16 (max {FLOAT16_MAX:g}); "
                "store this layer with dtype='float32' or 'bfloat16'"
            )
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    if dtype == "bfloat16":
        return _to_bfloat16_bits(values).astype("<u2").tobytes()
    raise ConfigError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")


def decode(blob: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode bytes written by :func:`encode` back to a float32 array of ``shape``."""
    if dtype == "float32":
        out = np.frombuffer(blob, dtype="<f4").copy()  # writable, like the other branches
    elif dtype == "float16":
        out = np.frombuffer(blob, dtype="<f2").astype(np.float32)
    elif dtype == "bfloat16":
        bits = np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16
        out = bits.view(np.float32)
    else:
        raise ConfigError(f"unknown storage dtype {dtype!r} in the store")
    return out.reshape(shape)


def as_stored(blob: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The values of :func:`decode`, without widening float16: a zero-copy float16 view for float16
    rows (readers that only compare values need no float32 copy), float32 for the others."""
    if dtype == "float16":
        return np.frombuffer(blob, dtype="<f2").reshape(shape)
    return decode(blob, dtype, shape)


def encode_indices(indices: np.ndarray, width: int) -> tuple[bytes, str]:
    """Sparse latent indices as the smallest unsigned dtype that holds ``width``."""
    kind = "<u2" if width <= np.iinfo(np.uint16).max + 1 else "<u4"
    return np.ascontiguousarray(indices, dtype=kind).tobytes(), kind


def decode_indices(blob: bytes, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(blob, dtype=kind).astype(np.int64).reshape(shape)


class EncodedBlock(NamedTuple):
    """One sequence's block of one layer as stored: what an ``activations`` row (or a shard) holds."""

    dtype: str  # the row's dtype: the layer's, or float32 where a float16 layer's block was promoted
    data: bytes
    indices: bytes | None  # sparse rows: the active latents' indices
    index_dtype: str | None
    k: int | None  # sparse rows: active latents per position
    n_positions: int


def encode_block(acts: np.ndarray | SparseActs, layer_dtype: str, float16_overflow: str, layer: str,
                 index: int | None) -> EncodedBlock:
    """Encode a ``[positions, channels]`` block (or :class:`SparseActs`) of a layer stored as
    ``layer_dtype``. A float16 layer's block with values beyond float16's range is stored as float32
    (logged) when ``float16_overflow`` is ``"promote"``, and raises :class:`DtypeRangeError` when it is
    ``"raise"``; values are never clipped. ``layer`` and ``index`` (the prompt) name the block in
    messages."""
    sparse = isinstance(acts, SparseActs)
    values = acts.values if sparse else np.asarray(acts)
    row_dtype = layer_dtype
    if row_dtype == "float16" and not fits_float16(values):
        prompt = "a prompt the store has not indexed yet" if index is None else f"prompt {index}"
        if float16_overflow == "raise":
            raise DtypeRangeError(
                f"layer {layer!r}, {prompt}: values beyond float16's range "
                f"(+-{FLOAT16_MAX:g}); declare the layer with dtype='float32' or 'bfloat16'"
            )
        log.warning("layer %r, %s: values beyond float16 range stored as float32", layer, prompt)
        row_dtype = "float32"
    idx_blob, idx_kind, k = None, None, None
    if sparse:
        idx_blob, idx_kind = encode_indices(acts.indices, acts.width)
        k = int(acts.indices.shape[1])
    return EncodedBlock(row_dtype, encode(values, row_dtype), idx_blob, idx_kind, k, int(values.shape[0]))
