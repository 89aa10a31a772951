"""What the reading commands share: opening a store read-only, printing frames, exit codes.

Exit codes: 0 success (also when nothing matched, said on stderr), 1 a data or runtime error (a
missing store — never created —, an unknown layer with close names, a damaged or foreign file, an
output that cannot be written), 2 a usage error (argparse; its line ends ``(see <command> --help)``).
Every error is one line on stderr, ``error: ...``; ``--debug`` (or ``INTERLATENT_DEBUG=1``) shows the
traceback instead.

``--format json`` prints strict JSON (RFC 8259: no ``Infinity`` or ``NaN`` tokens). A value that is
not a finite number prints as ``null``: missing, undefined or NaN. An infinite one prints as
``null`` too, and its row gets a ``"nonfinite"`` object saying which, e.g.
``{"value": null, ..., "nonfinite": {"value": "inf"}}`` (``"inf"`` or ``"-inf"``); rows without
infinities have no such key. Tables and CSV spell them ``inf`` / ``-inf`` / ``nan``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from interlatent.errors import DatabaseNotFoundError, InterlatentError

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("table", "json", "csv")


def open_db(path: str) -> Any:
    from interlatent.db import LatentDB

    local = path[len("sqlite:///"):] if path.startswith("sqlite:///") else path
    if os.path.isdir(os.path.expanduser(local)):
        raise DatabaseNotFoundError(f"{path!r} is a directory, not a store; give the path of the store file "
                                    "(e.g. latents.db)")
    return LatentDB(path, mode="r")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count such as --top)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (such as --window)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (such as a learning-rate multiple)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def existing_parent(path: Path, text: str, option: str) -> Path:
    """``path`` if the folder it goes into exists; else an argparse usage error naming that folder
    (an output option never creates folders)."""
    parent = path.parent
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"there is no directory {str(parent)!r} for {text!r}; create it first, "
                                         f"or choose another {option}")
    return path


def output_file(text: str) -> Path:
    """An argparse type for ``-o/--out``: a file in an existing folder, or an existing directory."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"there is no directory {text!r}; create it first, or give a file name")
    return existing_parent(path, text, "-o/--out")


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error "
                        "(also INTERLATENT_DEBUG=1)")


def add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="path of the store (sqlite:///path.db or path.db); it must exist")


def add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help='output format (default: table); json is strict JSON: a number that is not finite '
                             'is null, and an infinite one is also named in its row\'s "nonfinite" object')


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds; pandas' missing markers as None; inside lists
    and dicts, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {k: _finite_or_none(_plain(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(_plain(v)) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    import pandas as pd

    return None if pd.isna(value) else value


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row ready for strict JSON: non-finite floats become None, infinities are named in
    ``row["nonfinite"]`` (see the module docstring)."""
    out: dict[str, Any] = {}
    nonfinite: dict[str, str] = {}
    for key, value in row.items():
        value = _plain(value)
        if isinstance(value, float) and not math.isfinite(value):
            if math.isinf(value):
                nonfinite[key] = "inf" if value > 0 else "-inf"
            value = None
        out[key] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def json_records(df: "pd.DataFrame") -> list[dict[str, Any]]:
    """A frame as strict-JSON-ready row dicts (see :func:`json_row`)."""
    return [json_row(r) for r in df.to_dict(orient="records")]


def dumps_strict(data: Any) -> str:
    """JSON text that any parser accepts: raises rather than writes ``NaN`` or ``Infinity``."""
    return json.dumps(data, default=str, allow_nan=False)


def emit_rows(rows: list[dict[str, Any]], columns: list[str], fmt: str, *, empty: str = "no matches") -> None:
    """Print row dicts as an aligned table, JSON records or CSV, without pandas."""
    import csv

    if not rows:
        print(empty, file=sys.stderr)
    if fmt == "json":
        print(dumps_strict([json_row(r) for r in rows]))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    if not rows:
        return

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def emit(df: "pd.DataFrame", fmt: str, *, title: str | None = None, empty: str = "no matches") -> None:
    """Print a frame as an aligned table, JSON records or CSV; say on stderr when it is empty."""
    if df.empty:
        print(empty, file=sys.stderr)
    if fmt == "json":
        print(dumps_strict(json_records(df)))
    elif fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif not df.empty:
        if title:
            print(f"== {title} ==")
        import pandas as pd

        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(df.to_string(index=False))


def emit_many(frames: dict[str, "pd.DataFrame"], fmt: str) -> None:
    """Several named frames: one JSON object of record lists, CSV blocks, or titled tables."""
    if fmt == "json":
        print(dumps_strict({name: json_records(df) for name, df in frames.items()}))
        return
    for name, df in frames.items():
        if fmt == "csv":
            print(f"# {name}")
            df.to_csv(sys.stdout, index=False)
        elif not df.empty:
            emit(df, fmt, title=name)
            print()


def main_for(description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from interlatent.cli import UsageParser

    parser = UsageParser(prog=prog, description=description)
    add_arguments(parser)
    add_debug(parser)
    args = parser.parse_args(argv)
    return guarded(run, args)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sqlite_cause(exc: BaseException) -> sqlite3.Error | None:
    """The SQLite error behind ``exc`` (pandas wraps it in its own DatabaseError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, sqlite3.Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def error_line(exc: BaseException, db: str | None = None) -> str:
    """The one line a command prints for ``exc``: what went wrong, where, and what to do."""
    where = f" {db!r}" if db else ""
    cause = _sqlite_cause(exc)
    if cause is not None and "readonly" in str(cause):
        return (f"error: cannot read the store{where}: {_one_line(cause)}; SQLite must create its shared-memory "
                "file (-shm) beside a store it reads, and the store's folder is read-only: copy the store to a "
                "writable folder")
    if isinstance(exc, InterlatentError):
        return f"error: {_one_line(exc)}"
    if cause is not None:
        return (f"error: cannot read the store{where}: {_one_line(cause)}; the file is damaged or incomplete: "
                "restore it from a copy or collect it again")
    if isinstance(exc, OSError):
        name = f": {exc.filename!r}" if exc.filename else ""
        return f"error: {_one_line(exc.strerror or exc)}{name}"
    if isinstance(exc, (ValueError, KeyError, IndexError, OverflowError)):
        return (f"error: cannot read the store{where}: {type(exc).__name__}: {_one_line(exc)}; it may be damaged "
                "(rerun with --debug for the traceback)")
    return (f"error: unexpected {type(exc).__name__}: {_one_line(exc)}; this is a bug in interlatent, rerun with "
            "--debug for the traceback and report it")


def debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("INTERLATENT_DEBUG", "") not in ("", "0")


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; any error becomes one line on stderr and exit code 1 (with ``--debug`` or
    ``INTERLATENT_DEBUG=1`` it propagates, with its traceback)."""
    try:
        return int(run(args) or 0)
    except BrokenPipeError:  # the reader of stdout went away (``| head``): stop quietly, like any filter
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as exc:
        if debugging(args):
            raise
        print(error_line(exc, getattr(args, "db", None)), file=sys.stderr)
        return 1
