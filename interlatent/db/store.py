"""``LatentDB``: the SQLite activation store.

Layout (see DESIGN.md): one row per run, per sequence (prompt or episode), per token, and one row
per (layer, sequence) holding that sequence's ``[positions, channels]`` matrix as a BLOB. Writes are
one transaction per call; readers stream arrays. This module is the only one that speaks SQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from interlatent import __version__, naming
from interlatent.db import codec
from interlatent.db.records import SequenceRecord, SparseActs, scatter_dense
from interlatent.db.schema import check_version, current_version, migrate
from interlatent.db.stats import MomentAccumulator, StatBlock
from interlatent.errors import (
    ArtifactNotFoundError,
    ConfigError,
    DatabaseNotFoundError,
    DtypeRangeError,
    IncompleteDataWarning,
    IncompleteRunError,
    LayerExistsError,
    LayerNotFoundError,
    ReadOnlyError,
    SchemaVersionError,
    ShapeError,
    Terminated,
    closest,
    unknown_name,
)

class _LazyPandas:
    """pandas, imported on first use (it costs most of a reading command's start-up)."""

    def __getattr__(self, name: str) -> Any:
        import pandas

        return getattr(pandas, name)


pd = _LazyPandas()


log = logging.getLogger(__name__)

_SQL_VARS = 900  # stay below SQLite's bound-parameter limit in IN (...) lists
_NEG_BLOCK = re.compile(r"(?P<head>(?:^|.*[.:])layer\.)(?P<idx>-\d+)(?P<tail>(?:\..*|:.*)?)$")


def _now() -> str:
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


def _decoded(column: pd.Series, default: Any = None) -> pd.Series:
    """A DataFrame's JSON column, decoded to Python objects (``object`` dtype, so ``None`` stays ``None``)."""
    return pd.Series([decode_json(v, default) for v in column], index=column.index, dtype=object)


def _cannot_write(exc: BaseException) -> bool:
    """True for SQLite's errors about files it may not write or create (read-only file or folder)."""
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


def _like_pattern(text: str) -> str:
    """A LIKE pattern matching ``text`` as a literal substring (``%`` and ``_`` escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _chunks(seq: Sequence[Any], size: int = _SQL_VARS) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


# ---------------------------------------------------------------------- run owners
OWNER_GONE = "owner process gone (killed?)"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of a process from ``/proc`` (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0], fields[19]  # stat fields 3 (state) and 22 (starttime)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_identity(pid: int) -> str | None:
    """``boot id:start time`` of a process: a pid reused after the process ended, or after a reboot,
    gets another identity. None where ``/proc`` cannot tell (not Linux, or no such process)."""
    stat, boot = _proc_stat(pid), _boot_id()
    return None if stat is None or boot is None else f"{boot}:{stat[1]}"


_OWN_IDENTITY = (socket.gethostname(), os.getpid(), process_identity(os.getpid()))


def _own_identity() -> tuple[str, int, str | None]:
    """(hostname, pid, identity) of this process (recomputed after a fork)."""
    global _OWN_IDENTITY
    if _OWN_IDENTITY[1] != os.getpid():
        _OWN_IDENTITY = (socket.gethostname(), os.getpid(), process_identity(os.getpid()))
    return _OWN_IDENTITY


def owner_alive(host: str | None, pid: int | None, identity: str | None) -> bool | None:
    """Whether the process that owns a run still runs: True, False, or None where this machine
    cannot tell (another host, no owner recorded, or no POSIX signals)."""
    if host is None or pid is None or host != socket.gethostname() or os.name != "posix":
        return None
    try:
        os.kill(int(pid), 0)  # signal 0 checks existence only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return None
    stat = _proc_stat(int(pid))
    if stat is not None and stat[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    if identity is not None and stat is not None and process_identity(int(pid)) != identity:
        return False  # the pid now belongs to another process (or the machine rebooted)
    return True


# ---------------------------------------------------------------------- SIGTERM inside runs
_sigterm_lock = threading.Lock()
_sigterm_depth = 0
_sigterm_previous: Any = None
_sigterm_held_depth = 0  # > 0 while the main thread writes a run's final status
_sigterm_pending = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _sigterm_pending
    previous = _sigterm_previous
    if callable(previous):  # a handler installed before the run: it still hears the signal
        previous(signum, frame)
    if _sigterm_held_depth:
        _sigterm_pending = True  # raised once the run's status is written
        return
    raise Terminated("received SIGTERM")


def _arm_sigterm() -> bool:
    """Turn SIGTERM into :class:`Terminated` while a run is open (main thread only; nested runs
    share one handler). Returns whether it was armed (pair with :func:`_disarm_sigterm`)."""
    global _sigterm_depth, _sigterm_previous
    if threading.current_thread() is not threading.main_thread():
        return False  # signals reach the main thread only; a killed process is found on reopen
    with _sigterm_lock:
        if _sigterm_depth == 0:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is signal.SIG_IGN:
                return False  # the program chose to ignore SIGTERM: keep it that way
            try:
                signal.signal(signal.SIGTERM, _on_sigterm)
            except ValueError:  # not the main interpreter
                return False
            _sigterm_previous = previous
        _sigterm_depth += 1
    return True


def _disarm_sigterm() -> None:
    global _sigterm_depth, _sigterm_previous
    with _sigterm_lock:
        _sigterm_depth -= 1
        if _sigterm_depth == 0:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # unless someone replaced it meanwhile
                previous = _sigterm_previous
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            _sigterm_previous = None


@contextmanager
def _sigterm_held(raise_pending: bool = True) -> Iterator[None]:
    """Defer SIGTERM while the main thread writes a run's final status (Python runs signal handlers
    in the main thread only); a SIGTERM that came meanwhile raises :class:`Terminated` afterwards."""
    global _sigterm_held_depth, _sigterm_pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_held_depth += 1
    try:
        yield
    finally:
        _sigterm_held_depth -= 1
    if _sigterm_held_depth == 0 and _sigterm_pending:
        _sigterm_pending = False
        if raise_pending:
            raise Terminated("received SIGTERM")


def layer_kind(name: str) -> str:
    """The kind of a layer from its name: ``latent_sae:``/``latent:``/``probe:`` prefixes, else model."""
    for prefix, kind in (("latent_sae:", "latent_sae"), ("latent:", "latent"), ("probe:", "probe")):
        if name.startswith(prefix):
            return kind
    return "model"


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


class Activations(NamedTuple):
    """Activations of one layer: ``values`` is ``[tokens, channels]`` float32, ``tokens`` its rows."""

    values: np.ndarray
    tokens: pd.DataFrame
    channels: np.ndarray


@dataclass(frozen=True)
class LayerCompleteness:
    """Which runs wrote a layer, and how much of it came from runs that did not complete.

    ``runs`` maps run id to status (``complete``, ``interrupted``, ``running``, or ``running
    (stale)`` for a run whose owner process is gone but that a read-only open cannot mark);
    ``prompts`` counts per run how many prompts of this layer it wrote. ``sources`` are the
    same for the layers this one was computed from (a backfilled latent layer inherits them).
    """

    layer: str
    runs: dict[int, str]
    prompts: dict[int, int]
    sources: tuple[LayerCompleteness, ...] = ()

    @property
    def incomplete_runs(self) -> list[int]:
        """Runs of this layer that did not complete."""
        return sorted(r for r, status in self.runs.items() if status != "complete")

    @property
    def n_prompts(self) -> int:
        return sum(self.prompts.values())

    @property
    def n_incomplete_prompts(self) -> int:
        """Prompts of this layer that came from runs that did not complete."""
        return sum(self.prompts[r] for r in self.incomplete_runs)

    @property
    def complete(self) -> bool:
        """True when every run of this layer, and of every source layer, completed."""
        return not self.incomplete_runs and all(src.complete for src in self.sources)

    def describe(self) -> str:
        """In words: which runs did not complete, and how many prompts came from them."""
        parts = []
        if self.incomplete_runs:
            runs = ", ".join(f"run {r} ({self.runs[r]})" for r in self.incomplete_runs)
            parts.append(f"{self.n_incomplete_prompts} of its {self.n_prompts} prompts come from {runs}")
        for src in self.sources:
            if not src.complete:
                parts.append(f"it was computed from {src.layer!r}, where {src.describe()}")
        return "; ".join(parts)


class Run:
    """A handle on one run of the store: every write belongs to one."""

    def __init__(self, db: LatentDB, run_id: int) -> None:
        self.db = db
        self.run_id = run_id

    def write(
        self,
        records: Sequence[SequenceRecord],
        *,
        dtypes: dict[str, str] | None = None,
        layer_meta: dict[str, dict[str, Any]] | None = None,
        duplicates: str = "new",
        counts: dict[str, int] | None = None,
    ) -> list[int]:
        """Write one batch (see :meth:`LatentDB.write`). Returns the prompt indices written."""
        return self.db.write(self.run_id, records, dtypes=dtypes, layer_meta=layer_meta, duplicates=duplicates,
                             counts=counts)

    def finish(self, status: str = "complete", error: str | None = None) -> None:
        self.db.finish_run(self.run_id, status, error)

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id})"


class LatentDB:
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
        durability: ``"full"`` (default) makes the store survive power loss and OS crashes
            (SQLite ``synchronous=NORMAL``: the disk is synced at WAL checkpoints);
            ``"process"`` skips those syncs — several times faster to ingest, and still safe
            against the process crashing or being interrupted, like files written with
            ``numpy.save``, but not against power loss.

    Use as a context manager to close it on exit.
    """

    def __init__(self, uri: str | Path, *, mode: str = "rw", float16_overflow: str = "promote",
                 durability: str = "full") -> None:
        if mode not in ("rw", "r"):
            raise ConfigError(f"mode must be 'rw' or 'r', got {mode!r}")
        if durability not in ("full", "process"):
            raise ConfigError(f"durability must be 'full' or 'process', got {durability!r}")
        self.durability = durability
        if float16_overflow not in ("promote", "raise"):
            raise ConfigError(f"float16_overflow must be 'promote' or 'raise', got {float16_overflow!r}")
        self.path = self._parse_uri(uri)
        self.mode = mode
        self.float16_overflow = float16_overflow
        self._conn = self._connect()
        self._layer_cache: dict[str, LayerInfo] = {}
        self._metric_ids: dict[str, int] = {}
        self._recover_stale_runs()

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _parse_uri(uri: str | Path) -> Path:
        text = str(uri)
        if text.startswith("sqlite:///"):
            text = text[len("sqlite:///") :]
        elif text.startswith("sqlite://"):
            raise ConfigError(f"expected 'sqlite:///path.db' (three slashes) or a bare path, got {text!r}")
        if not text or text == ":memory:":
            raise ConfigError("LatentDB needs a file path (in-memory stores cannot be shared by readers)")
        return Path(text).expanduser()

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise ConfigError(f"{str(self.path)!r} is a directory; give the store's file path, e.g. "
                              f"{str(self.path / 'latents.db')!r}")
        conn = self._open_read_only() if self.mode == "r" else self._open_writable()
        conn.execute("PRAGMA busy_timeout = 30000")
        try:
            if self.mode == "rw":
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'NORMAL' if self.durability == 'full' else 'OFF'}")
                conn.execute("PRAGMA foreign_keys = ON")
                migrate(conn)
            else:
                version = current_version(conn)
                if version is None:
                    raise SchemaVersionError(f"{str(self.path)!r} is an empty SQLite file, not a store")
                check_version(version)
                from interlatent.db.schema import LATEST_VERSION

                if version < LATEST_VERSION:
                    raise SchemaVersionError(
                        f"store schema version {version} is older than this library's {LATEST_VERSION}; "
                        "open it once writable (LatentDB(path)) to migrate it"
                    )
        except sqlite3.OperationalError as exc:
            conn.close()
            if self.mode == "rw" and _cannot_write(exc):
                raise self._read_only_error(exc) from exc
            raise SchemaVersionError(f"{str(self.path)!r} is not a readable SQLite store: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise SchemaVersionError(f"{str(self.path)!r} is not a readable SQLite store: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writable(self) -> sqlite3.Connection:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(f"cannot create the store {str(self.path)!r}: a part of {str(parent)!r} is a file, "
                              "not a directory; pick another path") from exc
        except PermissionError as exc:
            raise ReadOnlyError(f"cannot create the folder {str(parent)!r} for the store {str(self.path)!r}: "
                                "permission denied; pick a writable place") from exc
        if self.path.exists() and not os.access(self.path, os.W_OK):  # SQLite would open it, then fail writes
            raise self._read_only_error(PermissionError("the file is read-only"))
        try:
            return sqlite3.connect(str(self.path), isolation_level=None)
        except sqlite3.OperationalError as exc:
            raise self._read_only_error(exc) if _cannot_write(exc) else ConfigError(
                f"SQLite cannot open {str(self.path)!r}: {exc}") from exc

    def _read_only_error(self, exc: BaseException) -> ReadOnlyError:
        """Why a writable open failed (a read-only file or folder), and what to do instead."""
        parent = self.path.parent
        if not self.path.exists():
            return ReadOnlyError(f"cannot create the store {str(self.path)!r}: its folder {str(parent)!r} is not "
                                 f"writable ({exc}); pick a writable place")
        if not os.access(self.path, os.W_OK):
            why = "the file is read-only"
        elif not os.access(parent, os.W_OK):
            why = (f"its folder {str(parent)!r} is read-only (SQLite writes {self.path.name}-wal and "
                   f"{self.path.name}-shm next to the store)")
        else:
            why = f"SQLite refused to write ({exc})"
        return ReadOnlyError(f"cannot open the store {str(self.path)!r} for writing: {why}; to read it, open it "
                             "with LatentDB(path, mode='r')")

    def _open_read_only(self) -> sqlite3.Connection:
        """A read-only connection; where the folder is read-only too (WAL readers need to create the
        ``-shm`` file), an immutable read of the main file, after checking that no committed writes
        wait in a ``-wal`` file that could not be read."""
        if not self.path.is_file():
            raise DatabaseNotFoundError(
                f"no store at {str(self.path)!r}; collect into it first (LatentDB(path) creates one)"
            )
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the WAL index, if any
            return conn
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not (isinstance(exc, sqlite3.OperationalError) and _cannot_write(exc)):
                raise SchemaVersionError(f"{str(self.path)!r} is not a readable SQLite store: {exc}") from exc
            wal = Path(f"{self.path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise ReadOnlyError(
                    f"{str(self.path)!r} has committed writes in {wal.name} ({wal.stat().st_size} bytes) that "
                    f"cannot be read without write access to {str(self.path.parent)!r} (SQLite needs to create "
                    f"{self.path.name}-shm there); open it once with LatentDB(path) where the folder is writable "
                    "(that folds the log into the store), or copy the store with its -wal file somewhere writable"
                ) from exc
        log.info("%s: read-only folder, reading the store as immutable", self.path)
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

    def flush(self) -> None:
        """Make every committed write durable in the main file (a WAL checkpoint)."""
        if self.mode == "rw":
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self.flush()
            finally:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> LatentDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LatentDB({str(self.path)!r}, mode={self.mode!r})"

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._require_writable()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException as exc:
            self._conn.execute("ROLLBACK")
            self._layer_cache.clear()
            self._metric_ids.clear()
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
                raise self._read_only_error(exc) from exc
            raise
        else:
            self._conn.execute("COMMIT")

    def _require_writable(self) -> None:
        if self.mode != "rw":
            raise ReadOnlyError(f"{self!r} was opened read-only; open it with mode='rw' to write")

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ runs
    def start_run(self, *, kind: str = "custom", model: str | None = None,
                  config: dict[str, Any] | None = None) -> Run:
        """Open a run (status ``running``), owned by this process. Prefer :meth:`run`, which closes
        it for you; a run left ``running`` by a process that is gone is marked ``interrupted`` when
        the store is next opened writable."""
        host, pid, identity = _own_identity()
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs(kind, model, config, status, created_at, library_version, owner_host,"
                " owner_pid, owner_started) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (kind, model, dumps(config or {}), _now(), __version__, host, pid, identity),
            )
        return Run(self, int(cur.lastrowid))

    def finish_run(self, run_id: int, status: str = "complete", error: str | None = None) -> None:
        if status not in ("complete", "interrupted", "running"):
            raise ConfigError(f"run status must be complete, interrupted or running; got {status!r}")
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?",
                         (status, error, _now(), run_id))

    @contextmanager
    def run(self, *, kind: str = "custom", model: str | None = None,
            config: dict[str, Any] | None = None) -> Iterator[Run]:
        """A run as a context manager: ``complete`` on success, ``interrupted`` on any exception
        (Ctrl-C included). Batches written before the exception stay readable.

        In the main thread, SIGTERM (``timeout``, batch schedulers, container stops) raises
        :class:`~interlatent.errors.Terminated` inside the block, so the run is marked
        ``interrupted`` too; the previous handler is restored on exit (and still called on
        SIGTERM if it was a Python function). SIGKILL, OOM kills and power loss leave the run
        ``running``: the next writable open marks it ``interrupted``.
        """
        armed = _arm_sigterm()
        try:
            handle = self.start_run(kind=kind, model=model, config=config)
            try:
                yield handle
            except BaseException as exc:
                with _sigterm_held(raise_pending=not isinstance(exc, Terminated)):
                    try:
                        if self._conn.in_transaction:  # a write cut short by the signal
                            self._conn.execute("ROLLBACK")
                        self.finish_run(handle.run_id, "interrupted", f"{type(exc).__name__}: {exc}")
                    except sqlite3.Error:  # the connection itself failed; the exception below says why
                        log.exception("could not mark run %s interrupted", handle.run_id)
                raise
            else:
                with _sigterm_held():
                    self.finish_run(handle.run_id, "complete")
        finally:
            if armed:
                _disarm_sigterm()

    def _running_runs(self) -> list[tuple[int, str | None, int | None, str | None]]:
        return self._q("SELECT run_id, owner_host, owner_pid, owner_started FROM runs WHERE status='running'")

    def stale_runs(self) -> list[int]:
        """Runs still marked ``running`` whose owner process is gone (killed, crashed, rebooted).

        A writable open marks these ``interrupted``; a read-only open can only report them. Runs of
        a live process, or of another machine (which this one cannot check), are not stale."""
        return [rid for rid, host, pid, ident in self._running_runs() if owner_alive(host, pid, ident) is False]

    def _recover_stale_runs(self) -> None:
        stale = self.stale_runs()
        if not stale:
            return
        if self.mode != "rw":
            log.warning("%s: runs %s are marked running but their process is gone (killed?); their layers are "
                        "incomplete (open the store writable to mark them interrupted)", self.path, stale)
            return
        with self._transaction() as conn:
            marks = ",".join("?" * len(stale))
            conn.execute(f"UPDATE runs SET status='interrupted', error=?, finished_at=? WHERE status='running'"
                         f" AND run_id IN ({marks})", [OWNER_GONE, _now(), *stale])
        log.warning("%s: marked runs %s interrupted: %s", self.path, stale, OWNER_GONE)

    def layer_completeness(self, layer: str) -> LayerCompleteness:
        """Which runs wrote ``layer`` (and the layers it was computed from), and whether each completed."""
        return self._completeness(self.resolve_layer(layer), set(self.stale_runs()), set())

    def _completeness(self, name: str, stale: set[int], seen: set[str]) -> LayerCompleteness:
        seen.add(name)
        info = self._layer_cache[name]
        runs: dict[int, str] = {}
        prompts: dict[int, int] = {}
        for rid, status, count in self._q(
            "SELECT COALESCE(a.run_id, s.run_id) AS rid, r.status, COUNT(*) FROM activations a"
            " JOIN sequences s ON s.seq_id = a.seq_id LEFT JOIN runs r ON r.run_id = COALESCE(a.run_id, s.run_id)"
            " WHERE a.layer_id=? GROUP BY rid", (info.layer_id,)
        ):
            status = status or "missing"
            runs[int(rid)] = f"{status} (stale)" if status == "running" and rid in stale else status
            prompts[int(rid)] = int(count)
        sources = []
        for src in (info.source, info.meta.get("in_layer")):
            if not isinstance(src, str):
                continue
            try:
                resolved = self.resolve_layer(src)
            except KeyError:
                continue  # a source that was never stored (e.g. a transcoder's block name)
            if resolved not in seen:
                sources.append(self._completeness(resolved, stale, seen))
        return LayerCompleteness(name, runs, prompts, tuple(sources))

    def check_complete(self, layer: str, *, action: str = "warn", what: str = "this analysis",
                       allow_incomplete: bool = False) -> LayerCompleteness:
        """Warn about (``action="warn"``, :class:`~interlatent.errors.IncompleteDataWarning`) or refuse
        (``"raise"``, :class:`~interlatent.errors.IncompleteRunError`) a layer that holds data from
        runs that did not complete, or was computed from one. ``what`` names the consumer in the
        message; ``allow_incomplete=True`` accepts partial data silently. Returns the completeness."""
        if action not in ("warn", "raise"):
            raise ConfigError(f"action must be 'warn' or 'raise', got {action!r}")
        report = self.layer_completeness(layer)
        if report.complete or allow_incomplete:
            return report
        message = (f"{what} uses layer {report.layer!r}, which holds partial data: {report.describe()}. "
                   "Resume or redo that collection for complete data, or pass allow_incomplete=True to use "
                   "the partial data knowingly")
        if action == "raise":
            raise IncompleteRunError(message)
        warnings.warn(message, IncompleteDataWarning, stacklevel=2)
        return report

    def runs(self) -> pd.DataFrame:
        """Every run: id, kind, model, status, times, config (parsed), owner, and ``stale`` (still
        ``running`` although its owner process is gone: a read-only open cannot mark it)."""
        df = pd.read_sql_query("SELECT * FROM runs ORDER BY run_id", self._conn)
        df["config"] = _decoded(df["config"], {})
        df["stale"] = df["run_id"].isin(self.stale_runs())
        return df

    # ------------------------------------------------------------------ labels
    def register_label_classes(self, names: Iterable[str], key: str = "label") -> dict[str, int]:
        """Give string labels stable class ids. New names take the next ids; known names keep theirs."""
        with self._transaction() as conn:
            return self._label_ids(conn, key, list(names))

    def _label_ids(self, conn: sqlite3.Connection, key: str, names: list[str]) -> dict[str, int]:
        known = dict(conn.execute("SELECT name, class_id FROM label_classes WHERE key=?", (key,)).fetchall())
        nxt = max(known.values(), default=-1) + 1
        for name in sorted(set(names) - set(known)):
            conn.execute("INSERT INTO label_classes(key, name, class_id) VALUES (?, ?, ?)", (key, name, nxt))
            known[name] = nxt
            nxt += 1
        return known

    def label_classes(self, key: str = "label") -> dict[str, int]:
        """Label name -> class id."""
        return dict(self._q("SELECT name, class_id FROM label_classes WHERE key=? ORDER BY class_id", (key,)))

    # ------------------------------------------------------------------ layers
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
        match = _NEG_BLOCK.match(name)
        if match:
            for info in self._layer_cache.values():
                n_blocks = info.meta.get("n_blocks")
                if n_blocks is None:
                    continue
                idx = int(match["idx"]) + int(n_blocks)
                candidate = f"{match['head']}{idx}{match['tail'] or ''}"
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
        with self._transaction() as conn:
            return self._register_layer(conn, name, width, dtype=dtype, kind=kind, storage=storage,
                                        hook_name=hook_name, source=source, artifact_id=artifact_id,
                                        run_id=run_id, meta=meta)

    def _register_layer(self, conn: sqlite3.Connection, name: str, width: int, *, dtype: str = "float16",
                        kind: str | None = None, storage: str = "dense", hook_name: str | None = None,
                        source: str | None = None, artifact_id: int | None = None,
                        run_id: int | None = None, meta: dict[str, Any] | None = None) -> LayerInfo:
        codec.check_dtype(dtype)
        if storage not in ("dense", "sparse"):
            raise ConfigError(f"storage must be 'dense' or 'sparse', got {storage!r}")
        row = conn.execute("SELECT layer_id, width FROM layers WHERE name=?", (name,)).fetchone()
        if row is not None:
            if row[1] != width:
                raise ShapeError(f"layer {name!r} is stored with width {row[1]}, got arrays of width {width}")
        else:
            conn.execute(
                "INSERT INTO layers(name, kind, width, dtype, storage, hook_name, source, artifact_id,"
                " run_id, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind or layer_kind(name), int(width), dtype, storage, hook_name, source,
                 artifact_id, run_id, dumps(meta or {}), _now()),
            )
        self._load_layers()
        return self._layer_cache[name]

    def delete_layer(self, name: str) -> None:
        """Remove a layer with its activations, stats, correlations, examples and explanations."""
        name = self.resolve_layer(name)
        with self._transaction() as conn:
            self._delete_layer_rows(conn, self._layer_cache[name].layer_id)
        self._load_layers()

    @staticmethod
    def _delete_layer_rows(conn: sqlite3.Connection, layer_id: int) -> None:
        for table in ("activations", "latent_examples", "latent_explanations", "stats", "correlations",
                      "logit_effects"):
            conn.execute(f"DELETE FROM {table} WHERE layer_id=?", (layer_id,))  # noqa: S608 (fixed names)
        conn.execute("DELETE FROM layers WHERE layer_id=?", (layer_id,))

    def replace_layer(self, built: str, name: str) -> None:
        """Make layer ``built`` the layer ``name``, in one transaction: a stored ``name`` goes with
        its activations, stats, correlations, examples and explanations, and ``built`` is renamed.

        A re-trained latent layer is written under :func:`interlatent.naming.building_name` and
        swapped in here, so a crash before this commit leaves the previous layer as it was."""
        with self._transaction() as conn:
            row = conn.execute("SELECT layer_id FROM layers WHERE name=?", (built,)).fetchone()
            if row is None:
                raise unknown_name("layer", built, self._layer_cache, hint="write the built layer first")
            old = conn.execute("SELECT layer_id FROM layers WHERE name=?", (name,)).fetchone()
            if old is not None:
                self._delete_layer_rows(conn, int(old[0]))
            conn.execute("UPDATE layers SET name=? WHERE layer_id=?", (name, int(row[0])))
        self._load_layers()

    # ------------------------------------------------------------------ writing
    def write(
        self,
        run_id: int,
        records: Sequence[SequenceRecord],
        *,
        dtypes: dict[str, str] | None = None,
        layer_meta: dict[str, dict[str, Any]] | None = None,
        duplicates: str = "new",
        counts: dict[str, int] | None = None,
    ) -> list[int]:
        """Write a batch of sequences with their tokens, metrics and activations, in one transaction.

        Args:
            run_id: the run the batch belongs to (see :meth:`run`).
            records: one :class:`SequenceRecord` per prompt or episode.
            dtypes: storage dtype per layer (``float16`` default; ``float32``, ``bfloat16``), used
                when the layer is first written.
            layer_meta: per-layer extras recorded when the layer is first written (``hook_name``,
                ``kind``, ``source``, ``n_blocks`` ...).

            duplicates: ``"new"`` (default): a record without ``prompt_index`` is a new sequence.
                ``"attach"``: a record without ``prompt_index`` whose text and token ids are already
                stored joins that sequence (its stored label, context and metrics are kept; metrics
                it lacks are added), and layers a sequence already holds are skipped, not refused.
                The lookup happens inside this write's transaction, so concurrent writers agree.
            counts: if given, incremented with ``new`` (sequences created), ``attached`` (records
                that joined a stored sequence), ``layers_skipped`` (layers already stored) and
                ``retokenised`` (new sequences whose text is stored with other token ids).

        A record whose ``prompt_index`` is already stored with the same text and length adds its
        layers to that sequence (collecting more layers over the same prompts); a different text at
        that index raises :class:`ConfigError`. A record without one takes its ``index_hint`` when
        that index is free, else the next free index. Either the whole batch is stored or nothing is.
        """
        if duplicates not in ("new", "attach"):
            raise ConfigError(f"duplicates must be 'new' or 'attach', got {duplicates!r}")
        dtypes = dtypes or {}
        layer_meta = layer_meta or {}
        counts = counts if counts is not None else {}
        for key in ("new", "attached", "layers_skipped", "retokenised"):
            counts.setdefault(key, 0)
        for rec in records:
            rec.validate()
        attach = duplicates == "attach"
        written: list[int] = []
        with self._transaction() as conn:
            next_index = conn.execute("SELECT COALESCE(MAX(prompt_index) + 1, 0) FROM sequences").fetchone()[0]
            label_names = [r.label for r in records if isinstance(r.label, str)]
            classes = self._label_ids(conn, "label", label_names) if label_names else {}
            stored = self._stored_by_text(conn, records) if attach else {}
            for rec in records:
                ids_blob = np.asarray(rec.token_ids, dtype="<i4").tobytes()
                found = stored.get((rec.kind, rec.text, ids_blob)) if rec.prompt_index is None else None
                if found is not None:
                    seq_id, rec_index = found
                    counts["attached"] += 1
                else:
                    if attach and rec.prompt_index is None and (rec.kind, rec.text) in stored:
                        counts["retokenised"] += 1
                    if rec.prompt_index is not None:
                        rec_index = int(rec.prompt_index)
                    elif rec.index_hint is not None and conn.execute(
                            "SELECT 1 FROM sequences WHERE prompt_index=?", (int(rec.index_hint),)).fetchone() is None:
                        rec_index = int(rec.index_hint)
                    else:
                        rec_index = next_index
                    next_index = max(next_index, rec_index + 1)
                    n_before = conn.total_changes
                    seq_id = self._write_sequence(conn, run_id, rec, rec_index, classes)
                    counts["new"] += int(conn.total_changes > n_before)
                    if attach and rec.text is not None:
                        stored.setdefault((rec.kind, rec.text, ids_blob), (seq_id, rec_index))
                        stored.setdefault((rec.kind, rec.text), (seq_id, rec_index))
                self._write_metrics(conn, seq_id, rec, keep_stored=found is not None)
                for layer, acts in rec.activations.items():
                    if attach and self._has_layer(conn, seq_id, layer):
                        counts["layers_skipped"] += 1
                        continue
                    self._write_activation(conn, run_id, seq_id, layer, acts, dtypes.get(layer),
                                           layer_meta.get(layer, {}), rec_index)
                written.append(rec_index)
        return written

    def _stored_by_text(self, conn: sqlite3.Connection, records: Sequence[SequenceRecord]
                        ) -> dict[tuple[Any, ...], tuple[int, int]]:
        """(kind, text, token-id bytes) and (kind, text) -> (seq_id, prompt_index) of the first stored
        sequence with these texts (and tokens)."""
        texts = sorted({r.text for r in records if r.text is not None and r.prompt_index is None})
        out: dict[tuple[str, str, bytes], tuple[int, int]] = {}
        for chunk in _chunks(texts):
            rows = conn.execute(
                "SELECT s.kind, s.text, t.token_ids, s.seq_id, s.prompt_index FROM sequences s JOIN tokens t"
                f" ON t.seq_id = s.seq_id WHERE s.text IN ({','.join('?' * len(chunk))})"  # noqa: S608
                " ORDER BY s.prompt_index", list(chunk)).fetchall()
            for kind, text, blob, seq_id, index in rows:
                out.setdefault((kind, text, bytes(blob)), (int(seq_id), int(index)))
                out.setdefault((kind, text), (int(seq_id), int(index)))
        return out

    def _has_layer(self, conn: sqlite3.Connection, seq_id: int, layer: str) -> bool:
        return conn.execute("SELECT 1 FROM activations a JOIN layers l ON l.layer_id = a.layer_id"
                            " WHERE l.name=? AND a.seq_id=?", (layer, seq_id)).fetchone() is not None

    def _write_sequence(self, conn: sqlite3.Connection, run_id: int, rec: SequenceRecord, index: int,
                        classes: dict[str, int]) -> int:
        row = conn.execute("SELECT seq_id, text, n_positions FROM sequences WHERE prompt_index=?",
                           (index,)).fetchone()
        if row is not None:
            if row[1] != rec.text or row[2] != rec.n_positions:
                raise ConfigError(
                    f"prompt_index {index} already holds another sequence ({row[2]} positions, "
                    f"text {str(row[1])[:40]!r}); write new prompts with prompt_index=None (the next "
                    "free index) or into a new store"
                )
            return int(row[0])
        label_id = classes.get(rec.label) if isinstance(rec.label, str) else None
        cur = conn.execute(
            "INSERT INTO sequences(run_id, prompt_index, kind, text, label, label_id, context, n_positions)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, index, rec.kind, rec.text, None if rec.label is None else dumps(rec.label),
             label_id, dumps(rec.context or {}), rec.n_positions),
        )
        seq_id = int(cur.lastrowid)
        positions = None
        if rec.positions is not None:
            positions = np.asarray(rec.positions, dtype=np.int64)
            if np.any(np.diff(positions) <= 0):
                raise ShapeError(f"positions of prompt {index} must be strictly increasing")
            if np.array_equal(positions, np.arange(rec.n_positions)):
                positions = None
        generated = None
        if rec.generated is not None and np.any(rec.generated):
            generated = np.asarray(rec.generated, dtype=np.uint8).tobytes()
        conn.execute(
            "INSERT INTO tokens(seq_id, token_ids, tokens, positions, generated, context) VALUES (?, ?, ?, ?, ?, ?)",
            (seq_id, np.asarray(rec.token_ids, dtype="<i4").tobytes(), dumps(list(rec.tokens)),
             None if positions is None else positions.astype("<i4").tobytes(), generated,
             None if rec.token_context is None else dumps(rec.token_context)),
        )
        return seq_id

    def _metric_id(self, conn: sqlite3.Connection, name: str) -> int:
        if name not in self._metric_ids:
            conn.execute("INSERT OR IGNORE INTO metrics(name) VALUES (?)", (name,))
            self._metric_ids[name] = int(
                conn.execute("SELECT metric_id FROM metrics WHERE name=?", (name,)).fetchone()[0]
            )
        return self._metric_ids[name]

    def _write_metrics(self, conn: sqlite3.Connection, seq_id: int, rec: SequenceRecord,
                       keep_stored: bool = False) -> None:
        rows = []
        for name, values in rec.metrics.items():
            try:
                arr = np.asarray(values, dtype="<f4")
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"metric {name!r} must be numeric per position (got {type(values).__name__}); "
                    "put non-numeric values in the record's context instead"
                ) from exc
            rows.append((seq_id, self._metric_id(conn, name), arr.tobytes()))
        if rows:
            verb = "INSERT OR IGNORE" if keep_stored else "INSERT OR REPLACE"
            conn.executemany(f"{verb} INTO token_metrics(seq_id, metric_id, data) VALUES (?, ?, ?)", rows)  # noqa: S608

    def _write_activation(self, conn: sqlite3.Connection, run_id: int, seq_id: int, layer: str, acts: Any,
                          dtype: str | None, meta: dict[str, Any], index: int) -> None:
        sparse = isinstance(acts, SparseActs)
        if not sparse:
            acts = np.asarray(acts)
        width = acts.width if sparse else int(acts.shape[1])
        info = self._layer_cache.get(layer)
        if info is None:
            extra = dict(meta)
            info = self._register_layer(
                conn, layer, width, dtype=dtype or "float16", kind=extra.pop("kind", None),
                storage="sparse" if sparse else "dense", hook_name=extra.pop("hook_name", None),
                source=extra.pop("source", None), artifact_id=extra.pop("artifact_id", None),
                run_id=run_id, meta=extra,
            )
        elif info.width != width:
            raise ShapeError(f"layer {layer!r} is stored with width {info.width}, got width {width}")
        if (info.storage == "sparse") != sparse:
            raise ShapeError(f"layer {layer!r} is stored {info.storage}; got {'sparse' if sparse else 'dense'} "
                             "activations")
        values = acts.values if sparse else acts
        row_dtype = info.dtype
        if row_dtype == "float16" and not codec.fits_float16(values):
            if self.float16_overflow == "raise":
                raise DtypeRangeError(
                    f"layer {layer!r}, prompt {index}: values beyond float16's range "
                    f"(+-{codec.FLOAT16_MAX:g}); declare the layer with dtype='float32' or 'bfloat16'"
                )
            log.warning("layer %r, prompt %d: values beyond float16 range stored as float32", layer, index)
            row_dtype = "float32"
        data = codec.encode(values, row_dtype)
        idx_blob, idx_kind, k = None, None, None
        if sparse:
            idx_blob, idx_kind = codec.encode_indices(acts.indices, width)
            k = int(acts.indices.shape[1])
        try:
            conn.execute(
                "INSERT INTO activations(layer_id, seq_id, n_positions, dtype, k, index_dtype, data, indices, run_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.layer_id, seq_id, int(values.shape[0]), row_dtype, k, idx_kind, data, idx_blob, run_id),
            )
        except sqlite3.IntegrityError as exc:
            raise LayerExistsError(
                f"layer {layer!r} is already stored for prompt {index}; db.delete_layer({layer!r}) first "
                "to recollect it"
            ) from exc

    def write_activations(
        self,
        run_id: int,
        layer: str,
        items: Sequence[tuple[int, Any]],
        *,
        dtype: str = "float16",
        layer_meta: dict[str, Any] | None = None,
    ) -> int:
        """Attach a layer's activations to sequences already stored (e.g. latents backfilled from a
        stored layer), one transaction: ``items`` are ``(prompt_index, [positions, channels] array or
        SparseActs)`` whose positions match the stored sequence. Returns the rows written."""
        with self._transaction() as conn:
            for index, acts in items:
                row = conn.execute("SELECT seq_id, n_positions FROM sequences WHERE prompt_index=?",
                                   (int(index),)).fetchone()
                if row is None:
                    raise ConfigError(f"no stored prompt with index {index}; write it with write() first")
                rows = acts.shape[0]
                if rows != row[1]:
                    raise ShapeError(f"prompt {index} has {row[1]} positions; got activations for {rows}")
                self._write_activation(conn, run_id, int(row[0]), layer, acts, dtype, layer_meta or {}, int(index))
        return len(items)

    def iter_sequence_blocks(self, layer: str, *, prompt_indices: Sequence[int] | None = None,
                             channels: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(prompt_index, [positions, channels] float32)`` for every sequence of a layer, in prompt order."""
        info = self.layer_info(layer)
        chans = self._channels(info, channels)
        rows = self._q("SELECT a.seq_id, s.prompt_index FROM activations a JOIN sequences s ON s.seq_id = a.seq_id"
                       " WHERE a.layer_id=? ORDER BY s.prompt_index", (info.layer_id,))
        if prompt_indices is not None:
            allowed = {int(i) for i in prompt_indices}
            rows = [r for r in rows if r[1] in allowed]
        index_of = dict(rows)
        for sid, block in self._iter_layer_rows(info, [r[0] for r in rows], chans):
            yield index_of[sid], block

    def prompt_indices(self, layer: str | None = None) -> list[int]:
        """Prompt indices stored (those with activations for ``layer`` when given), sorted."""
        if layer is None:
            return [r[0] for r in self._q("SELECT prompt_index FROM sequences ORDER BY prompt_index")]
        info = self.layer_info(layer)
        return [r[0] for r in self._q("SELECT s.prompt_index FROM activations a JOIN sequences s ON"
                                      " s.seq_id = a.seq_id WHERE a.layer_id=? ORDER BY s.prompt_index",
                                      (info.layer_id,))]

    # ------------------------------------------------------------------ reading: sequences and tokens
    def _seq_filter(self, prompt_index: int | Sequence[int] | None = None, prompt_like: str | None = None,
                    label: Any = None, run_id: int | None = None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if prompt_index is not None:
            indices = [int(prompt_index)] if np.isscalar(prompt_index) else [int(i) for i in prompt_index]
            if not indices:
                clauses.append("0")
            else:
                clauses.append(f"s.prompt_index IN ({','.join('?' * len(indices))})")
                params += indices
        if prompt_like is not None:
            clauses.append("s.text LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(prompt_like))
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
        df["label"] = _decoded(df["label"])
        df["context"] = _decoded(df["context"], {})
        return df

    def metric_names(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM metrics ORDER BY metric_id")]

    def _token_rows(self, seq_ids: Sequence[int], token_like: str | None = None) -> list[tuple[Any, ...]]:
        """(seq_id, prompt_index, label, n, token_ids, tokens, positions, generated) per sequence, in
        the order of ``seq_ids``; with ``token_like``, only sequences that may contain it."""
        rows: dict[int, tuple[Any, ...]] = {}
        for chunk in _chunks(list(seq_ids)):
            marks = ",".join("?" * len(chunk))
            sql = ("SELECT t.seq_id, s.prompt_index, s.label, s.n_positions, t.token_ids, t.tokens, t.positions,"
                   f" t.generated FROM tokens t JOIN sequences s ON s.seq_id = t.seq_id WHERE t.seq_id IN ({marks})")
            params: list[Any] = list(chunk)
            if token_like is not None and token_like.isascii():  # LIKE folds ASCII case only
                sql += " AND t.tokens LIKE ? ESCAPE '\\'"
                params.append(_like_pattern(json.dumps(token_like)[1:-1]))
            for row in self._q(sql, params):
                rows[row[0]] = row
        return [rows[s] for s in seq_ids if s in rows]

    def _token_frame(self, seq_ids: Sequence[int], metrics: bool = True,
                     token_like: str | None = None) -> pd.DataFrame:
        """Token rows of the given sequences (in that order), one DataFrame row per position."""
        rows = self._token_rows(seq_ids, token_like)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "prompt_index", "position", "token_id",
                                                             "generated")}
        texts: list[str] = []
        labels: list[Any] = []
        for seq_id, pidx, label, n, ids, toks, pos, gen in rows:
            cols["seq_id"].append(np.full(n, seq_id))
            cols["prompt_index"].append(np.full(n, pidx))
            cols["position"].append(np.arange(n) if pos is None else np.frombuffer(pos, dtype="<i4"))
            cols["token_id"].append(np.frombuffer(ids, dtype="<i4"))
            cols["generated"].append(np.zeros(n, bool) if gen is None else np.frombuffer(gen, np.uint8).astype(bool))
            texts += decode_json(toks, [])
            value = decode_json(label)
            labels += [value] * n
        data: dict[str, Any] = {k: (np.concatenate(v).astype(np.int64) if k != "generated" else np.concatenate(v))
                                if v else np.zeros(0, dtype=np.int64 if k != "generated" else bool)
                                for k, v in cols.items()}
        df = pd.DataFrame({"seq_id": data["seq_id"], "prompt_index": data["prompt_index"],
                           "position": data["position"], "token_id": data["token_id"],
                           "token": pd.Series(texts, dtype=object), "generated": data["generated"],
                           "label": pd.Series(labels, dtype=object)})
        if metrics and len(df):
            for name, values in self._metric_columns(df["seq_id"].to_numpy()).items():
                df[name] = values
        return df

    def _metric_columns(self, seq_col: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token metric columns aligned with ``seq_col`` (a sorted run of seq ids by position)."""
        uniq, starts = np.unique(seq_col, return_index=True)
        start_of = dict(zip(uniq.tolist(), starts.tolist()))
        names = dict(self._q("SELECT metric_id, name FROM metrics"))
        out: dict[str, np.ndarray] = {}
        for chunk_ids in _chunks(list(start_of)):
            marks = ",".join("?" * len(chunk_ids))
            for seq_id, metric_id, data in self._q(
                f"SELECT seq_id, metric_id, data FROM token_metrics WHERE seq_id IN ({marks})", chunk_ids
            ):
                col = out.setdefault(names[metric_id], np.full(len(seq_col), np.nan, dtype=np.float32))
                start = start_of[seq_id]
                vals = np.frombuffer(data, dtype="<f4")
                col[start : start + len(vals)] = vals
        return dict(sorted(out.items()))

    def tokens(self, *, prompt_index: int | Sequence[int] | None = None, token_like: str | None = None,
               prompt_like: str | None = None, label: Any = None, metrics: bool = True) -> pd.DataFrame:
        """Token metadata (prompt_index, position, token_id, token, generated, label, metrics...)."""
        seq_ids = self._seq_ids(prompt_index, prompt_like, label)
        df = self._token_frame(seq_ids, metrics=metrics, token_like=token_like)
        if token_like is not None:
            df = df[df["token"].fillna("").str.contains(token_like, case=False, regex=False)]
        return df.drop(columns=["seq_id"]).reset_index(drop=True)

    def _seq_ids(self, prompt_index: Any = None, prompt_like: str | None = None, label: Any = None,
                 run_id: int | None = None) -> list[int]:
        where, params = self._seq_filter(prompt_index, prompt_like, label, run_id)
        return [r[0] for r in self._q(f"SELECT s.seq_id FROM sequences s WHERE {where} ORDER BY s.prompt_index",
                                      params)]

    # ------------------------------------------------------------------ reading: activations
    def _decode_row(self, info: LayerInfo, n: int, dtype: str, k: int | None, idx_kind: str | None,
                    data: bytes, idx: bytes | None, channels: np.ndarray | None) -> np.ndarray:
        if k is None:
            dense = codec.decode(data, dtype, (n, info.width))
            return dense if channels is None else dense[:, channels]
        values = codec.decode(data, dtype, (n, k))
        indices = codec.decode_indices(idx, idx_kind, (n, k))
        if channels is None:
            return scatter_dense(indices, values, info.width)
        lookup = np.full(info.width, -1, dtype=np.int64)
        lookup[channels] = np.arange(len(channels))
        cols = lookup[indices]
        out = np.zeros((n, len(channels)), dtype=np.float32)
        rows, slots = np.nonzero(cols >= 0)
        out[rows, cols[rows, slots]] = values[rows, slots]
        return out

    def _iter_layer_rows(self, info: LayerInfo, seq_ids: Sequence[int] | None,
                         channels: np.ndarray | None) -> Iterator[tuple[int, np.ndarray]]:
        """(seq_id, [positions, channels]) for the layer, in prompt order (or ``seq_ids`` order)."""
        sql = ("SELECT a.seq_id, a.n_positions, a.dtype, a.k, a.index_dtype, a.data, a.indices"
               " FROM activations a")
        if seq_ids is None:
            cur = self._conn.execute(sql + " JOIN sequences s ON s.seq_id = a.seq_id WHERE a.layer_id=?"
                                     " ORDER BY s.prompt_index", (info.layer_id,))
            for row in cur:
                yield row[0], self._decode_row(info, *row[1:], channels)
            return
        for chunk in _chunks(list(seq_ids)):
            marks = ",".join("?" * len(chunk))
            rows = {r[0]: r for r in self._q(sql + f" WHERE a.layer_id=? AND a.seq_id IN ({marks})",
                                             [info.layer_id, *chunk])}
            for sid in chunk:
                if sid in rows:
                    yield sid, self._decode_row(info, *rows[sid][1:], channels)

    def _channels(self, info: LayerInfo, channels: Sequence[int] | int | None) -> np.ndarray | None:
        if channels is None:
            return None
        arr = np.atleast_1d(np.asarray(channels, dtype=np.int64))
        bad = arr[(arr < 0) | (arr >= info.width)]
        if bad.size:
            raise ConfigError(f"layer {info.name!r} has channels 0..{info.width - 1}; got {bad.tolist()}")
        return arr

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

        Filters: ``prompt_index`` (one or several), ``token_like`` (case-insensitive literal
        substring of the token text), ``prompt_like`` (substring of the prompt text), ``label``;
        ``channels`` selects columns; ``limit`` caps the number of tokens (in prompt order).
        """
        info = self.layer_info(layer)
        chans = self._channels(info, channels)
        where, params = self._seq_filter(prompt_index, prompt_like, label)
        seq_ids = [r[0] for r in self._q(
            "SELECT a.seq_id FROM activations a JOIN sequences s ON s.seq_id = a.seq_id"
            f" WHERE a.layer_id=? AND {where} ORDER BY s.prompt_index", [info.layer_id, *params])]
        meta = self._token_frame(seq_ids, metrics=metrics, token_like=token_like)
        keep = np.ones(len(meta), dtype=bool)
        if token_like is not None:
            keep &= meta["token"].fillna("").str.contains(token_like, case=False, regex=False).to_numpy()
        if limit is not None:
            keep &= np.cumsum(keep) <= int(limit)
        wanted = set(meta.loc[keep, "seq_id"].tolist())
        blocks = [b for _, b in self._iter_layer_rows(info, [s for s in seq_ids if s in wanted], chans)]
        width = info.width if chans is None else len(chans)
        values = np.concatenate(blocks) if blocks else np.zeros((0, width), dtype=np.float32)
        in_wanted = meta["seq_id"].isin(wanted).to_numpy()
        values = values[keep[in_wanted]]
        tokens = meta[keep].drop(columns=["seq_id"]).reset_index(drop=True)
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

    def iter_activations(
        self,
        layer: str,
        *,
        chunk_size: int = 8192,
        shuffle: bool = False,
        seed: int | None = None,
        prompt_indices: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        buffer_tokens: int = 262_144,
    ) -> Iterator[np.ndarray]:
        """Stream ``[<=chunk_size, channels]`` float32 chunks of a layer without loading it whole.

        With ``shuffle``, sequences are read in a seeded random order and tokens are shuffled within a
        buffer of ``buffer_tokens`` rows (memory use is bounded by that buffer).
        """
        for values, _ in self.iter_activation_chunks(layer, chunk_size=chunk_size, shuffle=shuffle, seed=seed,
                                                     prompt_indices=prompt_indices, channels=channels,
                                                     buffer_tokens=buffer_tokens):
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
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Like :meth:`iter_activations`, yielding ``(values, row_ids)`` where ``row_ids`` is
        ``[n, 2]`` (prompt_index, position index). ``layer`` may be a list of layers stored for the
        same sequences: then ``values`` is a tuple with one array per layer, rows aligned."""
        names = [layer] if isinstance(layer, str) else list(layer)
        infos = [self.layer_info(n) for n in names]
        chans = [self._channels(i, channels) for i in infos]
        rows = self._q(
            "SELECT a.seq_id, s.prompt_index, a.n_positions FROM activations a JOIN sequences s"
            " ON s.seq_id = a.seq_id WHERE a.layer_id=? ORDER BY s.prompt_index", (infos[0].layer_id,))
        if prompt_indices is not None:
            allowed = set(int(i) for i in prompt_indices)
            rows = [r for r in rows if r[1] in allowed]
        if shuffle:
            rng = np.random.default_rng(seed)
            rows = [rows[i] for i in rng.permutation(len(rows))]
        else:
            rng = None
        buf: list[list[np.ndarray]] = [[] for _ in infos]
        buf_ids: list[np.ndarray] = []
        buffered = 0
        limit = buffer_tokens if shuffle else chunk_size
        order = [r[0] for r in rows]
        index_of = {r[0]: (r[1], r[2]) for r in rows}
        iters = [self._iter_layer_rows(info, order, ch) for info, ch in zip(infos, chans)]
        for parts in zip(*iters):
            sid = parts[0][0]
            if any(p[0] != sid for p in parts):
                raise ShapeError(f"layers {names} are not stored for the same prompts; collect them together")
            pidx, n = index_of[sid]
            for j, (_, block) in enumerate(parts):
                if block.shape[0] != n:
                    raise ShapeError(f"layer {names[j]!r} has {block.shape[0]} positions for prompt {pidx}, "
                                     f"expected {n}")
                buf[j].append(block)
            buf_ids.append(np.stack([np.full(n, pidx), np.arange(n)], axis=1))
            buffered += n
            if buffered >= limit:
                yield from self._drain(buf, buf_ids, chunk_size, rng, keep_tail=True, single=len(infos) == 1)
                buffered = sum(b.shape[0] for b in buf[0])
        yield from self._drain(buf, buf_ids, chunk_size, rng, keep_tail=False, single=len(infos) == 1)

    @staticmethod
    def _drain(buf: list[list[np.ndarray]], buf_ids: list[np.ndarray], chunk_size: int,
               rng: np.random.Generator | None, keep_tail: bool, single: bool) -> Iterator[tuple[Any, np.ndarray]]:
        if not buf_ids:
            return
        arrays = [np.concatenate(b) for b in buf]
        ids = np.concatenate(buf_ids)
        if rng is not None:
            perm = rng.permutation(ids.shape[0])
            arrays = [a[perm] for a in arrays]
            ids = ids[perm]
        n_full = ids.shape[0] // chunk_size * chunk_size if keep_tail else ids.shape[0]
        for start in range(0, n_full, chunk_size):
            stop = min(start + chunk_size, n_full)
            vals = arrays[0][start:stop] if single else tuple(a[start:stop] for a in arrays)
            yield vals, ids[start:stop]
        for b, a in zip(buf, arrays):
            b.clear()
            if keep_tail and n_full < a.shape[0]:
                b.append(a[n_full:])
        buf_ids.clear()
        if keep_tail and n_full < ids.shape[0]:
            buf_ids.append(ids[n_full:])

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
            " COALESCE(SUM(LENGTH(a.data) + COALESCE(LENGTH(a.indices), 0)), 0) AS bytes"
            " FROM layers l LEFT JOIN activations a ON a.layer_id = l.layer_id WHERE l.name NOT LIKE ? ESCAPE '\\'"
            " GROUP BY l.layer_id ORDER BY l.name", self._conn, params=[_like_pattern(naming.BUILDING_PREFIX)[1:]])
        if prefix is not None:
            df = df[df["layer"].str.startswith(prefix)].reset_index(drop=True)
        return df

    # ------------------------------------------------------------------ stats
    def _metric_matrix(self, seq_ids: Sequence[int], lengths: Sequence[int], names: list[str],
                       name_ids: dict[str, int], label_ids: dict[int, int | None],
                       classes: list[str]) -> np.ndarray:
        """``[tokens, metrics]`` for the given sequences: token metrics then one-vs-rest label classes."""
        total = int(sum(lengths))
        out = np.full((total, len(names) + len(classes)), np.nan, dtype=np.float64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        start_of = {sid: (int(st), int(n)) for sid, st, n in zip(seq_ids, starts, lengths)}
        col_of = {name_ids[n]: j for j, n in enumerate(names)}
        for chunk in _chunks(list(seq_ids)):
            marks = ",".join("?" * len(chunk))
            for sid, mid, data in self._q(
                f"SELECT seq_id, metric_id, data FROM token_metrics WHERE seq_id IN ({marks})", chunk
            ):
                st, n = start_of[sid]
                out[st : st + n, col_of[mid]] = np.frombuffer(data, dtype="<f4")
        if classes:
            for sid in seq_ids:
                st, n = start_of[sid]
                lid = label_ids.get(sid)
                if lid is not None:
                    out[st : st + n, len(names) :] = 0.0
                    out[st : st + n, len(names) + lid] = 1.0
        return out

    def compute_stats(self, min_count: int = 5, layers: Sequence[str] | None = None,
                      chunk_tokens: int = 16_384) -> dict[str, int]:
        """Per-channel count, mean, std, min, max, fraction active (> 0) and the Pearson correlation
        of every channel with every numeric token metric, plus one-vs-rest indicators
        ``label==NAME`` of string labels — one streaming pass per layer, stored in the store.

        Channels with fewer than ``min_count`` nonzero values get no statblock (dead latents).
        Returns the number of channels stored per layer.
        """
        self._require_writable()
        names = self.metric_names()
        name_ids = {name: mid for mid, name in self._q("SELECT metric_id, name FROM metrics")}
        classes = list(self.label_classes())
        label_of = dict(self._q("SELECT seq_id, label_id FROM sequences"))
        metric_labels = names + [f"label=={c}" for c in classes]
        done: dict[str, int] = {}
        for layer in (layers or self.layers()):
            info = self.layer_info(layer)
            acc = MomentAccumulator(info.width, len(metric_labels))
            rows = self._q("SELECT a.seq_id, a.n_positions FROM activations a JOIN sequences s ON"
                           " s.seq_id=a.seq_id WHERE a.layer_id=? ORDER BY s.prompt_index", (info.layer_id,))
            group: list[tuple[int, int]] = []
            for i, row in enumerate(rows):
                group.append(row)
                if sum(n for _, n in group) >= chunk_tokens or i == len(rows) - 1:
                    ids = [g[0] for g in group]
                    x = np.concatenate([b for _, b in self._iter_layer_rows(info, ids, None)])
                    m = self._metric_matrix(ids, [g[1] for g in group], names, name_ids, label_of, classes)
                    acc.update(x, m)
                    group = []
            mean, std = acc.moments()
            r, n_metric = acc.correlations()
            keep = np.flatnonzero(acc.nonzero >= min_count)
            with self._transaction() as conn:
                conn.execute("DELETE FROM stats WHERE layer_id=?", (info.layer_id,))
                conn.execute("DELETE FROM correlations WHERE layer_id=?", (info.layer_id,))
                conn.executemany(
                    "INSERT INTO stats(layer_id, channel, count, active_count, mean, std, min, max)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(info.layer_id, int(c), acc.count, int(acc.active[c]), float(mean[c]), float(std[c]),
                      float(acc.min[c]), float(acc.max[c])) for c in keep])
                conn.executemany(
                    "INSERT INTO correlations(layer_id, channel, metric, r, n) VALUES (?, ?, ?, ?, ?)",
                    [(info.layer_id, int(c), metric_labels[j], float(r[c, j]), int(n_metric[c, j]))
                     for c in keep for j in range(len(metric_labels)) if np.isfinite(r[c, j])])
            done[info.name] = int(keep.size)
            log.info("stats for %s: %d of %d channels", info.name, keep.size, info.width)
        return done

    def iter_statblocks(self, layer: str | None = None, *, top: int | None = None) -> Iterator[StatBlock]:
        """Stored per-channel stats (see :meth:`compute_stats`), by layer then channel; each with
        ``top_correlations`` as ``[(metric, r), ...]`` strongest first (``top`` caps the list)."""
        infos = [self.layer_info(layer)] if layer is not None else [self.layer_info(n) for n in self.layers()]
        for info in infos:
            corr: dict[int, list[tuple[str, float]]] = {}
            used: dict[int, dict[str, int]] = {}
            for ch, metric, r, n in self._q("SELECT channel, metric, r, n FROM correlations WHERE layer_id=?",
                                            (info.layer_id,)):
                corr.setdefault(ch, []).append((metric, r))
                used.setdefault(ch, {})[metric] = n
            for ch, count, active, mean, std, lo, hi in self._q(
                "SELECT channel, count, active_count, mean, std, min, max FROM stats WHERE layer_id=?"
                " ORDER BY channel", (info.layer_id,)
            ):
                pairs = sorted(corr.get(ch, []), key=lambda p: -abs(p[1]))
                yield StatBlock(info.name, ch, count, active, mean, std, lo, hi, pairs[:top] if top else pairs,
                                used.get(ch, {}))

    def stats_frame(self, layer: str) -> pd.DataFrame:
        """Stored stats of a layer as a DataFrame (channel, count, active_count, frac_active, mean, std,
        min, max, top_metric, top_r, top_n: the tokens that correlation used)."""
        blocks = list(self.iter_statblocks(layer, top=1))
        return pd.DataFrame([{
            "channel": b.channel, "count": b.count, "active_count": b.active_count, "frac_active": b.frac_active,
            "mean": b.mean, "std": b.std, "min": b.min, "max": b.max,
            "top_metric": b.top_correlations[0][0] if b.top_correlations else None,
            "top_r": b.top_correlations[0][1] if b.top_correlations else np.nan,
            "top_n": b.correlation_counts.get(b.top_correlations[0][0]) if b.top_correlations else None,
        } for b in blocks], columns=["channel", "count", "active_count", "frac_active", "mean", "std", "min",
                                     "max", "top_metric", "top_r", "top_n"])

    # ------------------------------------------------------------------ latent examples
    def compute_latent_examples(self, layer: str, top: int = 32, chunk_tokens: int = 8192) -> int:
        """Store the ``top`` highest activating (prompt, position, value) of every channel of a layer.
        Returns the number of example rows written."""
        self._require_writable()
        info = self.layer_info(layer)
        best_v = np.full((0, info.width), -np.inf, dtype=np.float32)
        best_s = np.zeros((0, info.width), dtype=np.int64)
        best_p = np.zeros((0, info.width), dtype=np.int64)
        pending: list[np.ndarray] = []
        pend_s: list[np.ndarray] = []
        pend_p: list[np.ndarray] = []
        pending_n = 0

        def merge() -> None:
            nonlocal best_v, best_s, best_p, pending_n
            if not pending:
                return
            v = np.concatenate([best_v, *pending])
            s = np.concatenate([best_s, *[np.broadcast_to(a[:, None], (a.shape[0], info.width)) for a in pend_s]])
            p = np.concatenate([best_p, *[np.broadcast_to(a[:, None], (a.shape[0], info.width)) for a in pend_p]])
            if v.shape[0] > top:
                part = np.argpartition(-v, top - 1, axis=0)[:top]
                v, s, p = (np.take_along_axis(a, part, axis=0) for a in (v, s, p))
            best_v, best_s, best_p = v, s, p
            pending.clear(), pend_s.clear(), pend_p.clear()
            pending_n = 0

        for sid, block in self._iter_layer_rows(info, None, None):
            pending.append(block)
            pend_s.append(np.full(block.shape[0], sid))
            pend_p.append(np.arange(block.shape[0]))
            pending_n += block.shape[0]
            if pending_n >= chunk_tokens:
                merge()
        merge()
        order = np.argsort(-best_v, axis=0, kind="stable")
        best_v, best_s, best_p = (np.take_along_axis(a, order, axis=0) for a in (best_v, best_s, best_p))
        positions = {}  # seq_id -> positions array (row index -> stored position)
        for sid, _, _, n, _, _, pos, _ in self._token_rows(np.unique(best_s).tolist()):
            positions[sid] = np.arange(n) if pos is None else np.frombuffer(pos, dtype="<i4")
        rows = []
        for ch in range(info.width):
            rank = 0
            for j in range(best_v.shape[0]):
                val = float(best_v[j, ch])
                if not val > 0:  # the -inf fill, NaN and inactive; +inf is a real top value
                    continue
                sid = int(best_s[j, ch])
                rows.append((info.layer_id, ch, rank, sid, int(positions[sid][best_p[j, ch]]), val))
                rank += 1
        with self._transaction() as conn:
            conn.execute("DELETE FROM latent_examples WHERE layer_id=?", (info.layer_id,))
            conn.executemany("INSERT INTO latent_examples(layer_id, channel, rank, seq_id, position, value)"
                             " VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def _example_rows(self, layer: str, channel: int | None = None,
                      top: int | None = None) -> list[tuple[int, int, int, int, int, float]]:
        """``(channel, rank, seq_id, prompt_index, position, value)`` of stored top examples."""
        info = self.layer_info(layer)
        sql = ("SELECT e.channel, e.rank, e.seq_id, s.prompt_index, e.position, e.value FROM latent_examples e"
               " JOIN sequences s ON s.seq_id = e.seq_id WHERE e.layer_id=?")
        params: list[Any] = [info.layer_id]
        if channel is not None:
            sql += " AND e.channel=?"
            params.append(int(channel))
        if top is not None:
            sql += " AND e.rank < ?"
            params.append(int(top))
        return self._q(sql + " ORDER BY e.channel, e.rank", params)

    def latent_example_rows(self, layer: str, top: int | None = None) -> list[tuple[int, int, int, int, float]]:
        """Stored top examples as ``(channel, rank, prompt_index, position, value)`` tuples."""
        return [(c, r, p, pos, v) for c, r, _, p, pos, v in self._example_rows(layer, top=top)]

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
        out = {}
        for _, pidx, label, n, _ids, toks, pos, _gen in self._token_rows(seq_ids, token_like):
            positions = np.arange(n) if pos is None else np.frombuffer(pos, dtype="<i4").astype(np.int64)
            out[int(pidx)] = (positions, decode_json(toks, []), decode_json(label))
        return out

    def latent_examples(self, layer: str, channel: int | None = None, top: int | None = None) -> pd.DataFrame:
        """Stored top examples: channel, rank, prompt_index, position, token, value (best first)."""
        df = pd.DataFrame(self._example_rows(layer, channel, top),
                          columns=["channel", "rank", "seq_id", "prompt_index", "position", "value"])
        token_at: dict[tuple[int, int], str] = {}
        for sid, _, _, n, _, toks, pos, _ in self._token_rows(df["seq_id"].unique().tolist()):
            positions = range(n) if pos is None else np.frombuffer(pos, dtype="<i4").tolist()
            token_at.update({(sid, int(p)): t for p, t in zip(positions, decode_json(toks, []))})
        df.insert(4, "token", [token_at.get((s, p)) for s, p in zip(df["seq_id"], df["position"])])
        return df.drop(columns=["seq_id"])

    def set_explanations(self, layer: str, explanations: Mapping[int, str], *, source: str = "manual",
                         scores: Mapping[int, float] | None = None) -> int:
        """Store a text explanation per channel (replacing earlier ones for those channels).

        ``source`` says who wrote them (``"manual"``, a model's name, ...); ``scores`` optionally
        says how well each predicts the channel's activations. Returns how many were written."""
        info = self.layer_info(layer)
        rows = []
        for channel, text in explanations.items():
            c = int(channel)
            if not 0 <= c < info.width:
                raise ConfigError(f"channel {channel} is outside {info.name!r} (width {info.width}; valid 0.."
                                  f"{info.width - 1})")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"the explanation of channel {c} must be a non-empty string, got {text!r}")
            score = None if scores is None or channel not in scores else float(scores[channel])
            rows.append((info.layer_id, c, text.strip(), str(source), score, _now()))
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO latent_explanations(layer_id, channel, text, source, score,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def explanations(self, layer: str) -> pd.DataFrame:
        """Stored explanations of a layer: channel, text, source, score, created_at (by channel)."""
        info = self.layer_info(layer)
        return pd.read_sql_query("SELECT channel, text, source, score, created_at FROM latent_explanations"
                                 " WHERE layer_id=? ORDER BY channel", self._conn, params=[info.layer_id])

    # ------------------------------------------------------------------ artifacts
    def add_artifact(self, name: str, kind: str, *, architecture: str | None = None, layer: str | None = None,
                     path: str | Path | None = None, data: bytes | None = None,
                     config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> int:
        """Record a trained module (a path to its saved folder or file, or its bytes) with its JSON
        config and evaluation metrics. Returns the artifact id.

        A path inside the store's folder is recorded relative to it, so the store can move with its
        ``{name}_artifacts`` folder; other paths are recorded absolute."""
        if path is None and data is None:
            raise ConfigError("an artifact needs a path or its bytes")
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO artifacts(name, kind, architecture, layer, path, data, config, metrics, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind, architecture, layer, None if path is None else self._stored_path(path), data,
                 dumps(config or {}), dumps(metrics or {}), _now()),
            )
        return int(cur.lastrowid)

    def _stored_path(self, path: str | Path) -> str:
        full = Path(path).expanduser().resolve()
        try:
            return full.relative_to(self.path.expanduser().resolve().parent).as_posix()
        except ValueError:
            return str(full)

    def _artifact_path(self, stored: str | None) -> str | None:
        """The absolute path of a recorded artifact: relative rows are under the store's folder; an
        absolute row whose target is gone is looked for under the store's folder by its last parts
        (the store moved with its artifacts folder before paths were recorded relative)."""
        if stored is None:
            return None
        folder = self.path.expanduser().resolve().parent
        path = Path(stored)
        if not path.is_absolute():
            return str(folder / path)
        if not path.exists():
            for n in (2, 1, 3):
                candidate = folder.joinpath(*path.parts[-n:])
                if len(path.parts) > n and candidate.exists():
                    return str(candidate)
        return stored

    def artifacts(self) -> pd.DataFrame:
        """Every artifact: id, name, kind, architecture, layer, path (absolute), config and metrics (parsed)."""
        df = pd.read_sql_query("SELECT artifact_id, name, kind, architecture, layer, path, config, metrics,"
                               " created_at FROM artifacts ORDER BY artifact_id", self._conn)
        df["path"] = df["path"].map(self._artifact_path)
        df["config"] = _decoded(df["config"], {})
        df["metrics"] = _decoded(df["metrics"], {})
        return df

    def get_artifact(self, artifact: int | str) -> dict[str, Any]:
        """One artifact by id, or by name (the newest of that name): id, name, kind, architecture,
        layer, path (absolute), data, config and metrics. Raises :class:`ArtifactNotFoundError`
        (a ``KeyError``) with the closest names."""
        cols = "artifact_id, name, kind, architecture, layer, path, data, config, metrics"
        if isinstance(artifact, str):
            row = self._conn.execute(f"SELECT {cols} FROM artifacts WHERE name=? ORDER BY artifact_id DESC LIMIT 1",
                                     (artifact,)).fetchone()
        elif isinstance(artifact, (int, np.integer)) and not isinstance(artifact, bool):
            row = self._conn.execute(f"SELECT {cols} FROM artifacts WHERE artifact_id=?", (int(artifact),)).fetchone()
        else:
            raise ConfigError(f"an artifact is named by its id (int) or its name (str), got {artifact!r}")
        if row is None:
            names = [r[0] for r in self._q("SELECT DISTINCT name FROM artifacts")]
            if isinstance(artifact, str):
                close = closest(artifact, names)
                hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close else
                        f"known names: {', '.join(repr(n) for n in sorted(names)[:12]) or 'none yet'}")
                raise ArtifactNotFoundError(f"no artifact named {artifact!r}; {hint} (db.artifacts() lists them)")
            ids = [r[0] for r in self._q("SELECT artifact_id FROM artifacts ORDER BY artifact_id")]
            known = f"ids {ids[0]}..{ids[-1]}" if ids else "none yet"
            raise ArtifactNotFoundError(f"no artifact with id {artifact} (known: {known}); db.artifacts() lists them")
        keys = ["artifact_id", "name", "kind", "architecture", "layer", "path", "data", "config", "metrics"]
        out = dict(zip(keys, row))
        out["path"] = self._artifact_path(out["path"])
        out["config"] = decode_json(out["config"], {})
        out["metrics"] = decode_json(out["metrics"], {})
        return out

    # ------------------------------------------------------------------ interventions
    def add_intervention(self, layer: str, kind: str, spec: dict[str, Any], results: dict[str, Any]) -> int:
        """Record a patching experiment (what was done, and its measured effects)."""
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO interventions(layer, kind, spec, results, created_at)"
                               " VALUES (?, ?, ?, ?, ?)", (layer, kind, dumps(spec), dumps(results), _now()))
        return int(cur.lastrowid)

    def interventions(self, layer: str | None = None) -> pd.DataFrame:
        sql = "SELECT intervention_id, layer, kind, spec, results, created_at FROM interventions"
        params: list[Any] = []
        if layer is not None:
            sql += " WHERE layer=?"
            params.append(layer)
        df = pd.read_sql_query(sql + " ORDER BY intervention_id", self._conn, params=params)
        df["spec"] = _decoded(df["spec"], {})
        df["results"] = _decoded(df["results"], {})
        return df

    # ------------------------------------------------------------------ logit effects
    def set_logit_effects(self, layer: str, token_ids: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray],
                          tokens: Mapping[int, str] | None = None, channels: Sequence[int] | None = None) -> int:
        """Store, per channel, the tokens its decoder direction promotes and suppresses through the
        unembedding (see :func:`interlatent.analysis.logit_effects.compute_logit_effects`).

        ``token_ids`` / ``values``: ``{"promoted": [C, k], "suppressed": [C, k]}``, strongest first,
        for ``channels`` (default: every channel, ``C`` = the layer's width); ``tokens`` maps ids to
        their text. Replaces what was stored for those channels, in one transaction. Returns the
        number of rows written."""
        info = self.layer_info(layer)
        chans = np.arange(info.width) if channels is None else np.asarray(channels, dtype=np.int64).reshape(-1)
        if chans.size and (chans.min() < 0 or chans.max() >= info.width):
            raise ConfigError(f"channels must lie in 0..{info.width - 1} for {info.name!r}, got {chans.tolist()[:8]}")
        rows = []
        for direction in ("promoted", "suppressed"):
            if direction not in token_ids or direction not in values:
                raise ConfigError(f"logit effects need {direction!r} token ids and values; got keys "
                                  f"{sorted(token_ids)} and {sorted(values)}")
            ids, vals = np.asarray(token_ids[direction]), np.asarray(values[direction], dtype=np.float64)
            if ids.ndim != 2 or ids.shape != vals.shape or ids.shape[0] != chans.size:
                raise ShapeError(f"{direction} token ids and values must both be [{chans.size} channels, k]; got "
                                 f"{list(ids.shape)} and {list(vals.shape)}")
            for i, c in enumerate(chans.tolist()):
                for rank, (t, v) in enumerate(zip(ids[i].tolist(), vals[i].tolist())):
                    rows.append((info.layer_id, c, direction, rank, int(t), None if tokens is None else
                                 tokens.get(int(t)), float(v)))
        with self._transaction() as conn:
            conn.executemany("DELETE FROM logit_effects WHERE layer_id=? AND channel=?",
                             [(info.layer_id, int(c)) for c in chans.tolist()])
            conn.executemany("INSERT INTO logit_effects(layer_id, channel, direction, rank, token_id, token, value)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def logit_effects(self, layer: str, channel: int | None = None) -> pd.DataFrame:
        """Stored logit effects: channel, direction (promoted | suppressed), rank, token_id, token,
        value — by channel, promoted first, strongest first. Empty where none were computed."""
        info = self.layer_info(layer)
        sql = "SELECT channel, direction, rank, token_id, token, value FROM logit_effects WHERE layer_id=?"
        params: list[Any] = [info.layer_id]
        if channel is not None:
            sql += " AND channel=?"
            params.append(int(channel))
        df = pd.read_sql_query(sql + " ORDER BY channel, direction, rank", self._conn, params=params)
        df["token"] = df["token"].astype(object).where(df["token"].notna(), None)
        return df
