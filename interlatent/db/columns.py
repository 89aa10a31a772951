"""How Python values sit in the store's SQLite columns.

JSON text columns (:func:`dumps` / :func:`decode_json`), UTC timestamps, ``LIKE`` patterns that match
a literal substring, and the one way to run a query over a long ``IN (...)`` list (:func:`in_chunks`).
pandas is imported on first use: it costs most of a reading command's start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

SQL_VARS = 900  # stay below SQLite's bound-parameter limit in IN (...) lists


class _LazyPandas:
    """pandas, imported on first use."""

    def __getattr__(self, name: str) -> Any:
        import pandas

        return getattr(pandas, name)


pd = _LazyPandas()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; store it as str or a number")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=True)


def decode_json(value: Any, default: Any = None) -> Any:
    """A JSON column's value, or ``default`` where the column is NULL.

    SQLite's NULL reaches us as ``None`` from the sqlite3 module and from pandas 2, but as a float
    NaN from pandas 3 (its string columns): both mean missing.
    """
    if value is None or (isinstance(value, float) and value != value):
        return default
    return json.loads(value)


def decoded(column: pd.Series, default: Any = None) -> pd.Series:
    """A DataFrame's JSON column, decoded to Python objects (``object`` dtype, so ``None`` stays ``None``)."""
    return pd.Series([decode_json(v, default) for v in column], index=column.index, dtype=object)


def like_pattern(text: str) -> str:
    """A LIKE pattern matching ``text`` as a literal substring (``%`` and ``_`` escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def token_like_pattern(text: str, *, in_json: bool = False) -> str | None:
    """A LIKE pattern that every token text containing ``text`` case-insensitively (as Python's
    ``str.lower`` compares) matches, or None where LIKE cannot tell (a non-ASCII ``text``: LIKE folds
    ASCII case only). ``in_json``: for texts inside a JSON list. ``i`` and ``k`` become ``_``:
    ``'\u0130'.lower()`` holds an ``i`` and ``'\u212a'.lower()`` is ``k``, which LIKE does not
    fold. Callers check the texts it lets through."""
    if not text.isascii():
        return None
    return re.sub("[ikIK]", "_", like_pattern(json.dumps(text)[1:-1] if in_json else text))


def token_text(token: Any) -> str:
    """The text a token filter matches against: a missing token is ``''``."""
    if not token:
        return ""
    return token if isinstance(token, str) else str(token)


def token_contains(tokens: Sequence[Any], token_like: str) -> np.ndarray:
    """True where the token text contains ``token_like``, case-insensitively as Python's
    ``str.lower`` compares (the token index and every token filter agree on it), bool ``[tokens]``."""
    needle = token_like.lower()
    return np.fromiter((needle in token_text(t).lower() for t in tokens), dtype=bool, count=len(tokens))


def in_chunks(values: Sequence[Any], size: int = SQL_VARS) -> Iterator[tuple[list[Any], str]]:
    """``(chunk, marks)`` over ``values`` in slices SQLite can bind, ``marks`` being the ``?,?,...``
    of an ``IN ({marks})`` list for that chunk."""
    values = list(values)
    for i in range(0, len(values), size):
        chunk = values[i : i + size]
        yield chunk, marks(len(chunk))


def marks(n: int) -> str:
    """``?,?,...`` for an ``IN`` list of ``n`` values known to be short (below :data:`SQL_VARS`)."""
    return ",".join("?" * n)
