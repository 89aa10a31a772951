"""A background writer: collection hands its batches to one writer thread through a bounded queue.

The forward thread copies what it captured out of the model (numpy, in the storage dtype) and calls
:meth:`BackgroundWriter.submit`; the writer thread encodes and stores it, so the model's next
forward pass runs while SQLite writes. The writer thread opens its own connection to the same file
(SQLite connections belong to the thread that opened them), so the caller's connection stays free
for reads: in WAL mode both see every committed batch.

- **Bounded**: at most ``max_batches`` batches, and at most ``max_bytes`` bytes of activations,
  are handed over and not yet written (queued or being written; one batch larger than
  ``max_bytes`` is let through alone): ``submit`` blocks until the writer catches up, so memory
  stays bounded when the store is slower than the model.
- **Grouped**: batches that wait when the writer is free are written by one :meth:`LatentDB.write`
  call (one transaction, up to ``group_batches`` of them): fewer commits, each still whole.
- **Errors**: an exception in the writer thread is raised again in the caller, the same object
  (type, message, traceback), at the next ``submit`` or at :meth:`close`; the writer stops at once.
- **Interrupts**: leaving the ``with`` block by an exception (Ctrl-C, SIGTERM as
  :class:`~interlatent.errors.Terminated`, an error of the caller) calls :meth:`abort`: the
  batches already queued (at most ``max_batches``) are written, each transaction committed whole,
  then the thread stops; what the caller had not submitted is not written. A process killed
  outright (SIGKILL) loses the write in progress as a whole: SQLite rolls back a transaction that
  never committed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from interlatent.db.owners import sigterm_held
from interlatent.db.records import SequenceRecord, SparseActs
from interlatent.errors import ConfigError

if TYPE_CHECKING:
    from interlatent.db.store import LatentDB

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 2**20
Batch = Sequence[SequenceRecord] | Callable[[], Sequence[SequenceRecord]]


def records_nbytes(records: Sequence[SequenceRecord]) -> int:
    """Bytes of activation data the records hold (what a queued batch keeps alive)."""
    total = 0
    for rec in records:
        for acts in rec.activations.values():
            if isinstance(acts, SparseActs):
                total += int(getattr(acts.values, "nbytes", 0)) + int(getattr(acts.indices, "nbytes", 0))
            else:
                total += int(getattr(acts, "nbytes", 0))
    return total


class BackgroundWriter:
    """One writer thread storing batches of a run, fed by a bounded queue; use as a context manager.

    Args:
        db: the store (its file is opened again, writable, in the writer thread).
        run_id: the run every batch belongs to.
        max_batches: batches that may wait in the queue (>= 1).
        max_bytes: bytes of activations that may wait in the queue.
        group_batches: most queued batches written in one transaction.
        write_options: keyword options of :meth:`LatentDB.write` (``dtypes``, ``layer_meta``,
            ``duplicates``, ``counts``), the same for every batch; ``counts`` is updated by the
            writer thread (read it after :meth:`close`).
        opener: makes the writer thread's store (default: ``db``'s class on ``db``'s file, with its
            ``durability`` and ``float16_overflow``).
    """

    def __init__(self, db: LatentDB, run_id: int, *, max_batches: int = 4, max_bytes: int = DEFAULT_MAX_BYTES,
                 group_batches: int = 8, write_options: dict[str, Any] | None = None,
                 opener: Callable[[], LatentDB] | None = None) -> None:
        if max_batches < 1:
            raise ConfigError(f"max_batches must be >= 1 (0 means no background writer), got {max_batches}")
        if max_bytes < 1 or group_batches < 1:
            raise ConfigError(f"max_bytes and group_batches must be >= 1, got {max_bytes} and {group_batches}")
        self.run_id = int(run_id)
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.group_batches = group_batches
        self.write_options = dict(write_options or {})
        self._opener = opener or (lambda: type(db)(db.path, float16_overflow=db.float16_overflow,
                                                   durability=db.durability))
        self._queue: deque[tuple[Batch, int]] = deque()
        self._pending = 0  # batches handed over and not yet written (queued or being written)
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._closing = False  # no more batches: write what is queued, then stop
        self._error: BaseException | None = None
        self.peak_batches = 0
        self.peak_bytes = 0
        self.batches_written = 0
        self.transactions = 0
        self._thread = threading.Thread(target=self._work, name="interlatent-writer", daemon=True)
        self._started = False

    # ------------------------------------------------------------------ the caller's side
    def start(self) -> Self:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()

    @property
    def pending_batches(self) -> int:
        """Batches handed over and not yet written (queued, or in the write in progress)."""
        with self._cond:
            return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes of activations those batches hold."""
        with self._cond:
            return self._pending_bytes

    def submit(self, records: Sequence[SequenceRecord] | Callable[[], Sequence[SequenceRecord]], *,
               nbytes: int | None = None) -> None:
        """Queue one batch; blocks while the queue is full. Raises the writer's exception, if any.

        ``records`` may be a function that makes the batch's records: the writer thread calls it
        (what it raises comes back like a write error); ``nbytes`` then gives the bytes it holds."""
        if not self._started:
            raise ConfigError("BackgroundWriter.submit before start(): use it as a context manager")
        if callable(records):
            size = int(nbytes or 0)
        else:
            for rec in records:  # refuse a malformed batch here, where the caller can see which
                rec.validate()
            size = records_nbytes(records)
        with self._cond:
            if self._closing:
                raise ConfigError("BackgroundWriter.submit after close(): open a new writer")
            while self._error is None and self._pending and (
                    self._pending >= self.max_batches or self._pending_bytes + size > self.max_bytes):
                self._cond.wait(0.5)  # a timeout keeps Ctrl-C and SIGTERM prompt in the main thread
            self._raise_error()
            self._queue.append((records if callable(records) else list(records), size))
            self._pending += 1
            self._pending_bytes += size
            self.peak_batches = max(self.peak_batches, self._pending)
            self.peak_bytes = max(self.peak_bytes, self._pending_bytes)
            self._cond.notify_all()

    def close(self) -> None:
        """Write every queued batch, stop the thread, and raise the writer's exception, if any."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            self._join()
        except BaseException:  # Ctrl-C or SIGTERM while the queue drains: let the writer finish first
            with sigterm_held(raise_pending=False):
                self._join()
            raise
        with self._cond:
            self._raise_error()

    def abort(self) -> None:
        """Write the batches already queued, then stop the thread. Raises nothing: the caller is
        already leaving by an exception (a writer error is logged)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with sigterm_held(raise_pending=False):  # a second SIGTERM must not cut the wait short
            self._join()
        if self._error is not None:
            log.error("the background writer had failed too: %s: %s", type(self._error).__name__, self._error)

    def _join(self) -> None:
        if self._started:
            while self._thread.is_alive():
                self._thread.join(0.5)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ the writer thread
    def _take(self) -> list[tuple[Batch, int]] | None:
        """The next batches to write (several when they wait), or None to stop."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            group = []
            while self._queue and len(group) < self.group_batches:
                group.append(self._queue.popleft())
            return group

    def _written(self, group: list[tuple[Batch, int]]) -> None:
        with self._cond:
            self._pending -= len(group)
            self._pending_bytes -= sum(size for _, size in group)
            self.batches_written += len(group)
            self.transactions += 1
            self._cond.notify_all()

    def _work(self) -> None:
        store = None
        try:
            store = self._opener()
            while (group := self._take()) is not None:
                batches = [batch() if callable(batch) else batch for batch, _ in group]
                store.write(self.run_id, [rec for records in batches for rec in records], **self.write_options)
                self._written(group)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            with self._cond:
                self._error = exc
                self._queue.clear()
                self._pending = self._pending_bytes = 0
                self._cond.notify_all()
        finally:
            if store is not None:
                try:  # no checkpoint here: SQLite's own, and the caller's close, fold the log in
                    store._conn.close()
                except Exception:  # the store's own error is already recorded, or the data is committed
                    log.exception("closing the background writer's store connection failed")


class SynchronousWriter:
    """The same interface without a thread: each batch is written before :meth:`submit` returns
    (what collectors do with ``write_queue=0``)."""

    def __init__(self, db: LatentDB, run_id: int, write_options: dict[str, Any] | None = None) -> None:
        self.db, self.run_id, self.write_options = db, int(run_id), dict(write_options or {})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, records: Batch, *, nbytes: int | None = None) -> None:
        self.db.write(self.run_id, records() if callable(records) else records, **self.write_options)


def batch_writer(db: LatentDB, run_id: int, queue: int, write_options: dict[str, Any], *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> BackgroundWriter | SynchronousWriter:
    """A :class:`BackgroundWriter` with ``queue`` batches of room, or for ``queue=0`` a
    :class:`SynchronousWriter`; either is a context manager with ``submit(records)``."""
    if not queue:
        return SynchronousWriter(db, run_id, write_options)
    return BackgroundWriter(db, run_id, max_batches=queue, max_bytes=max_bytes, write_options=write_options)
