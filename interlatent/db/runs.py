"""Runs: every write belongs to one, and a layer is only as complete as the runs that wrote it.

A run is opened ``running`` by a process (its owner, see :mod:`interlatent.db.owners`) and closed
``complete`` or ``interrupted``; ``resumed`` marks an interrupted run that a later run finished over
the same prompts. A run left ``running`` by a process that is gone is *stale*: a writable open
marks it ``interrupted``. :class:`LayerCompleteness` says which runs wrote a layer (and the layers
it was computed from) and how much of it came from runs that did not complete.
"""

from __future__ import annotations

import logging
import sqlite3
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from interlatent import __version__
from interlatent.db.columns import decode_json, decoded, dumps, marks, now, pd
from interlatent.db.layers import LayerRegistry
from interlatent.db.owners import OWNER_GONE, arm_sigterm, disarm_sigterm, own_identity, owner_alive, sigterm_held
from interlatent.db.records import SequenceRecord
from interlatent.errors import ConfigError, IncompleteDataWarning, IncompleteRunError, Terminated

if TYPE_CHECKING:
    from interlatent.db.store import LatentDB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCompleteness:
    """Which runs wrote a layer, and how much of it came from runs that did not complete.

    ``runs`` maps run id to status (``complete``, ``interrupted``, ``resumed`` — interrupted, then
    finished by a later run over the same prompts —, ``running``, or ``running (stale)`` for a run
    whose owner process is gone but that a read-only open cannot mark);
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
        return sorted(r for r, status in self.runs.items() if status not in ("complete", "resumed"))

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

    def write(self, records: Sequence[SequenceRecord], **options: Any) -> list[int]:
        """Write one batch of this run: :meth:`LatentDB.write` with its keyword options (``dtypes``,
        ``layer_meta``, ``duplicates``, ``counts``). Returns the prompt indices written."""
        return self.db.write(self.run_id, records, **options)

    def finish(self, status: str = "complete", error: str | None = None) -> None:
        self.db.finish_run(self.run_id, status, error)

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id})"


class RunLog(LayerRegistry):
    """The part of :class:`~interlatent.db.store.LatentDB` that opens, closes and audits runs."""

    def start_run(self, *, kind: str = "custom", model: str | None = None,
                  config: dict[str, Any] | None = None) -> Run:
        """Open a run (status ``running``), owned by this process. Prefer :meth:`run`, which closes
        it for you; a run left ``running`` by a process that is gone is marked ``interrupted`` when
        the store is next opened writable."""
        host, pid, identity = own_identity()
        with self.atomic() as conn:
            cur = conn.execute(
                "INSERT INTO runs(kind, model, config, status, created_at, library_version, owner_host,"
                " owner_pid, owner_started) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (kind, model, dumps(config or {}), now(), __version__, host, pid, identity),
            )
        return Run(self, int(cur.lastrowid))

    def finish_run(self, run_id: int, status: str = "complete", error: str | None = None) -> None:
        if status not in ("complete", "interrupted", "running", "resumed"):
            raise ConfigError(f"run status must be complete, interrupted, resumed or running; got {status!r}")
        with self.atomic() as conn:
            conn.execute("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?",
                         (status, error, now(), run_id))

    def mark_resumed(self, run_id: int, texts: Sequence[str], layers: Sequence[str]) -> list[int]:
        """After run ``run_id`` completed ``layers`` over every prompt of ``texts``, mark the runs it
        resumed ``resumed`` (their data is whole again) and return their ids.

        A run qualifies when it did not complete (interrupted, or running with its owner gone),
        every row it wrote to ``layers`` belongs to a prompt of ``texts``, and it set out to collect
        no more prompts than ``texts`` holds. A run of a live process, or one that wrote prompts
        outside ``texts`` (a resume over a subset), stays incomplete."""
        wanted = set(texts)
        layer_ids = [self._layer_cache[n].layer_id for n in (self.resolve_layer(x) for x in layers)]
        stale = set(self.stale_runs())
        small_enough: dict[int, bool] = {}
        in_layers = marks(len(layer_ids))
        for rid, status, config in self._q(
            "SELECT DISTINCT r.run_id, r.status, r.config FROM activations a JOIN runs r ON r.run_id = a.run_id"
            f" WHERE a.layer_id IN ({in_layers}) AND r.run_id != ? AND r.status IN ('interrupted', 'running')",
            (*layer_ids, int(run_id)),
        ):
            if status == "running" and rid not in stale:
                continue
            n_prompts = decode_json(config, {}).get("n_prompts")
            small_enough[int(rid)] = isinstance(n_prompts, int) and n_prompts <= len(wanted)
        resumed = []
        for rid, fits in small_enough.items():
            outside = [t for (t,) in self._q(
                f"SELECT DISTINCT s.text FROM activations a JOIN sequences s ON s.seq_id = a.seq_id"
                f" WHERE a.run_id=? AND a.layer_id IN ({in_layers})", (rid, *layer_ids)) if t not in wanted]
            if fits and not outside:
                resumed.append(rid)
        with self.atomic():
            for rid in resumed:
                self.finish_run(rid, "resumed", f"resumed by run {int(run_id)}")
        if resumed:
            log.info("runs %s were resumed by run %d: their layers hold whole data", resumed, int(run_id))
        return resumed

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
        armed = arm_sigterm()
        try:
            handle = self.start_run(kind=kind, model=model, config=config)
            try:
                yield handle
            except BaseException as exc:
                with sigterm_held(raise_pending=not isinstance(exc, Terminated)):
                    try:
                        if self._conn.in_transaction:  # a write cut short by the signal
                            self._conn.execute("ROLLBACK")
                        self.finish_run(handle.run_id, "interrupted", f"{type(exc).__name__}: {exc}")
                    except sqlite3.Error:  # the connection itself failed; the exception below says why
                        log.exception("could not mark run %s interrupted", handle.run_id)
                raise
            else:
                with sigterm_held():
                    self.finish_run(handle.run_id, "complete")
        finally:
            if armed:
                disarm_sigterm()

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
        with self.atomic() as conn:
            conn.execute(f"UPDATE runs SET status='interrupted', error=?, finished_at=? WHERE status='running'"
                         f" AND run_id IN ({marks(len(stale))})", [OWNER_GONE, now(), *stale])
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
        df["config"] = decoded(df["config"], {})
        df["stale"] = df["run_id"].isin(self.stale_runs())
        return df

