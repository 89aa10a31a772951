"""Opening a store: the SQLite connection, its pragmas, migrations, and nestable transactions.

A writable open (``mode="rw"``) creates the file and its folder if missing, turns on WAL (readers
keep reading while a writer writes) and applies pending migrations (:mod:`interlatent.db.schema`).
A read-only open (``mode="r"``) refuses a missing file and an old schema; in a read-only folder,
where SQLite cannot create the ``-shm`` file WAL readers need, it reads the file as immutable once
it has checked that no committed writes wait in a ``-wal`` file. :meth:`StoreConnection.atomic` is
a transaction that nests: inside another it is a SAVEPOINT, so one public method can call another
and still be one all-or-nothing write.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from interlatent.db.schema import LATEST_VERSION, check_version, current_version, is_busy, migrate
from interlatent.errors import ConfigError, DatabaseNotFoundError, ReadOnlyError, SchemaVersionError

if TYPE_CHECKING:
    from interlatent.db.layers import LayerInfo

log = logging.getLogger(__name__)

_savepoint_names = itertools.count()


def cannot_write(exc: BaseException) -> bool:
    """True for SQLite's errors about files it may not write or create (read-only file or folder)."""
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


def parse_uri(uri: str | Path) -> Path:
    """The file of ``"sqlite:///path.db"`` or of a bare path."""
    text = str(uri)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif text.startswith("sqlite://"):
        raise ConfigError(f"expected 'sqlite:///path.db' (three slashes) or a bare path, got {text!r}")
    if not text or text == ":memory:":
        raise ConfigError("LatentDB needs a file path (in-memory stores cannot be shared by readers)")
    return Path(text).expanduser()


class StoreConnection:
    """The part of :class:`~interlatent.db.store.LatentDB` that owns the connection."""

    path: Path
    mode: str
    durability: str
    _conn: sqlite3.Connection
    _layer_cache: dict[str, LayerInfo]
    _metric_ids: dict[str, int]
    _after_commit: list[Callable[[], Any]]
    _index_pending: list[Any]  # what the writer noted for the search index, merged at the commit
    _token_pending: list[Any]  # what the writer noted for the token index, indexed at the commit
    _vocab_cache: dict[Any, int]

    def _open(self, uri: str | Path, mode: str, durability: str) -> None:
        if mode not in ("rw", "r"):
            raise ConfigError(f"mode must be 'rw' or 'r', got {mode!r}")
        if durability not in ("full", "process"):
            raise ConfigError(f"durability must be 'full' or 'process', got {durability!r}")
        self.path = parse_uri(uri)
        self.mode = mode
        self.durability = durability
        self._layer_cache = {}
        self._metric_ids = {}
        self._after_commit = []
        self._index_pending = []
        self._token_pending = []
        self._vocab_cache = {}
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise ConfigError(f"{str(self.path)!r} is a directory; give the store's file path, e.g. "
                              f"{str(self.path / 'latents.db')!r}")
        conn = self._open_read_only() if self.mode == "r" else self._open_writable()
        conn.execute("PRAGMA busy_timeout = 30000")
        try:
            if self.mode == "rw":
                _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))  # needs a moment alone
                conn.execute(f"PRAGMA synchronous = {'NORMAL' if self.durability == 'full' else 'OFF'}")
                conn.execute("PRAGMA foreign_keys = ON")
                migrate(conn)
            else:
                version = current_version(conn)
                if version is None:
                    raise SchemaVersionError(f"{str(self.path)!r} is an empty SQLite file, not a store")
                check_version(version)
                if version < LATEST_VERSION:
                    raise SchemaVersionError(
                        f"store schema version {version} is older than this library's {LATEST_VERSION}; "
                        "open it once writable (LatentDB(path)) to migrate it"
                    )
        except sqlite3.OperationalError as exc:
            conn.close()
            if self.mode == "rw" and cannot_write(exc):
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
            raise self._read_only_error(exc) if cannot_write(exc) else ConfigError(
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
            if not (isinstance(exc, sqlite3.OperationalError) and cannot_write(exc)):
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LatentDB({str(self.path)!r}, mode={self.mode!r})"

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One all-or-nothing write: everything inside is committed together, or nothing is.

        Outside a transaction this is one (``BEGIN IMMEDIATE`` ... ``COMMIT``); inside one it is a
        SAVEPOINT, so an exception rolls back only what this block wrote and the enclosing block
        decides what happens to the rest. Yields the connection.

        Clean-ups registered with :meth:`after_commit` inside the block run once the outermost
        transaction has committed (deleting files the commit stopped referring to), and are dropped
        with a rollback of the block that registered them."""
        self._require_writable()
        conn = self._conn
        savepoint = f"interlatent_{next(_savepoint_names)}" if conn.in_transaction else None
        mark = len(self._after_commit)
        conn.execute("BEGIN IMMEDIATE" if savepoint is None else f"SAVEPOINT {savepoint}")
        index_mark = len(self._index_pending)
        token_mark = len(self._token_pending)
        try:
            yield conn
            if savepoint is None:
                self._before_commit(conn)
        except BaseException as exc:
            del self._after_commit[mark:]
            del self._index_pending[index_mark:]  # what a rolled-back block noted goes with it
            del self._token_pending[token_mark:]
            if conn.in_transaction:  # SQLite itself may have rolled back already (e.g. disk full)
                conn.execute("ROLLBACK" if savepoint is None else f"ROLLBACK TO {savepoint}")
                if savepoint is not None:
                    conn.execute(f"RELEASE {savepoint}")
            self._layer_cache.clear()  # a rolled-back write may have registered layers or metrics
            self._metric_ids.clear()
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
                raise self._read_only_error(exc) from exc
            raise
        else:
            conn.execute("COMMIT" if savepoint is None else f"RELEASE {savepoint}")
            if savepoint is None:
                pending, self._after_commit[:] = list(self._after_commit), []
                for step in pending:
                    try:
                        step()
                    except Exception:  # the commit stands; a clean-up that failed leaves only garbage
                        log.exception("%s: a clean-up after a commit failed", self.path)

    def after_commit(self, step: Callable[[], Any]) -> None:
        """Run ``step`` once the current outermost transaction commits (never if it rolls back);
        outside a transaction, now."""
        if self._conn.in_transaction:
            self._after_commit.append(step)
        else:
            step()

    def _before_commit(self, conn: sqlite3.Connection) -> None:
        """Last writes of the outermost transaction, inside it (the search and token indexes merge here)."""
        self._index_pending.clear()
        self._token_pending.clear()

    _transaction = atomic  # the name the store's methods used before transactions nested

    def _require_writable(self) -> None:
        if self.mode != "rw":
            raise ReadOnlyError(f"{self!r} was opened read-only; open it with mode='rw' to write")

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()


def _retry_busy(step: Callable[[], Any], attempts: int = 10) -> Any:
    """Run ``step``, retried with backoff while SQLite says another connection holds the lock: a
    switch of journal mode on a new store needs it alone and may report busy without waiting."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return None
