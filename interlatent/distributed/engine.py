"""Ray, imported when first needed, and what every distributed job shares: fetching results so that
a worker's own exception reaches the caller, and splitting a layer's sequences into parts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from interlatent.errors import ConfigError, MissingDependencyError, WorkerError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'interlatent-toolkit[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, started on this machine (``ray.init()``) when no cluster is connected yet."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"the distributed engine needs Ray, which is not installed ({exc}); "
                                     f"install it with {INSTALL_HINT}") from exc
    if not ray.is_initialized():
        log.info("no Ray cluster connected: starting a local one (call ray.init(...) first to choose)")
        ray.init()
    return ray


def check_workers(num_workers: int) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be a positive int, got {num_workers!r}")
    return num_workers


def fetch(ray: Any, refs: Any, what: str) -> Any:
    """``ray.get(refs)``, raising a worker's exception as itself (chained to Ray's report, which holds
    the worker's traceback) and a lost worker as :class:`~interlatent.errors.WorkerError`."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from exc
        raise
    except ray.exceptions.RayActorError as exc:
        if getattr(exc, "actor_init_failed", False):
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise WorkerError(f"a {what} worker could not start: {lines[-1] if lines else type(exc).__name__}. What "
                              "a worker is given (model, tokenizer, factories, functions) must unpickle there: "
                              "functions of a module the workers cannot import need "
                              "ray.cloudpickle.register_pickle_by_value(module) or a Ray runtime_env") from exc
        raise WorkerError(f"a {what} worker was lost before it returned its part ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing of that part was stored. "
                          "Run again (a collection resumes: prompts already stored are skipped)") from exc


def split_contiguous(weights: Sequence[int], parts: int) -> list[slice]:
    """At most ``parts`` contiguous, non-empty slices of ``weights`` with about equal sums (in order)."""
    total = sum(weights)
    out: list[slice] = []
    start, acc = 0, 0
    for i, w in enumerate(weights):
        acc += w
        if len(out) < parts - 1 and acc * parts >= total * (len(out) + 1) and i + 1 < len(weights):
            out.append(slice(start, i + 1))
            start = i + 1
    if start < len(weights):
        out.append(slice(start, len(weights)))
    return out
