"""One exception hierarchy for the whole library.

Every error subclasses :class:`InterlatentError` and, where one fits, the matching builtin, so
``except KeyError`` keeps working for code that does not know about Interlatent. Messages say what
was expected, what came, and (for names) the closest valid spellings.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterlatentError(Exception):
    """Base class of every error raised by Interlatent."""


class DatabaseNotFoundError(InterlatentError, FileNotFoundError):
    """A store was opened for reading at a path that does not exist."""


class SchemaVersionError(InterlatentError, RuntimeError):
    """The store's schema version is unknown, newer than this library, or not a store at all."""


class ReadOnlyError(InterlatentError, PermissionError):
    """A write was attempted on a store opened read-only."""


class LayerNotFoundError(InterlatentError, KeyError):
    """A layer or hook-point name is not known; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class LayerExistsError(InterlatentError, ValueError):
    """Activations for this layer and sequence are already stored."""


class ShapeError(InterlatentError, ValueError):
    """An array or tensor does not have the shape the operation needs."""


class DtypeRangeError(InterlatentError, OverflowError):
    """Values do not fit the storage dtype (e.g. beyond float16's +-65504)."""


class RunInterruptedError(InterlatentError, RuntimeError):
    """A collection or training run stopped before completing."""


class ConfigError(InterlatentError, ValueError):
    """An argument or configuration value is invalid."""


class ArtifactError(InterlatentError, ValueError):
    """A saved artifact is missing, malformed, or of an unknown architecture."""


class ModelLoadError(InterlatentError, OSError):
    """A model could not be loaded; the message says what was tried."""


class NotEnoughDataError(InterlatentError, ValueError):
    """There is too little (or too uniform) data for the requested analysis."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The closest spellings of ``name`` among ``candidates`` (best first)."""
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if len(found) < n:
        found += [c for c in pool if name and (name in c or c in name) and c not in found]
    return found[:n]


def unknown_name(kind: str, name: str, candidates: Iterable[str], hint: str = "") -> LayerNotFoundError:
    """Build a :class:`LayerNotFoundError` whose message names the closest valid spellings."""
    pool = sorted(set(candidates))
    close = closest(name, pool)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    elif pool:
        shown = ", ".join(repr(c) for c in pool[:12])
        msg += f"; valid names: {shown}{' …' if len(pool) > 12 else ''}"
    else:
        msg += f"; there are no {kind}s yet"
    if hint:
        msg += f" ({hint})"
    return LayerNotFoundError(msg)


class TrainingDivergedError(InterlatentError, RuntimeError):
    """Training produced NaN or inf (too high a learning rate, or degenerate batches)."""


class IncompleteRunError(InterlatentError, RuntimeError):
    """A layer holds data from runs that did not complete (killed, interrupted or still running)."""


class IncompleteDataWarning(UserWarning):
    """A consumer uses a layer that holds data from runs that did not complete."""


class Terminated(SystemExit):
    """The process received SIGTERM inside ``LatentDB.run()``.

    Raised from the signal handler so the run is marked ``interrupted`` on the way out. Like
    ``SystemExit`` (exit status 143, as after SIGTERM) and unlike an Exception, ``except Exception``
    does not swallow it; uncaught, the process exits quietly with that status after cleanup.
    """

    def __init__(self, message: str = "received SIGTERM") -> None:
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArtifactNotFoundError(ArtifactError, KeyError):
    """No artifact has the id or name asked for; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class OutputError(InterlatentError, OSError):
    """An output file (a plot, a report) could not be written where it was asked for."""


class ShardError(InterlatentError, OSError):
    """A Parquet activation shard the catalog refers to is missing, unreadable or not what was written."""


class CheckpointError(InterlatentError, ValueError):
    """A training checkpoint cannot be resumed: it was written for another configuration (shape,
    layer, seed, data, schedule), or its files are not a checkpoint of this format."""


class MissingDependencyError(InterlatentError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class WorkerError(InterlatentError, RuntimeError):
    """A distributed worker was lost (its process or node died) before it returned its part."""


class ResumeError(InterlatentError, ValueError):
    """``resume=True`` found no interrupted run to continue, or one collected with another config."""
