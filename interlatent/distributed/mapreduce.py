"""Per-channel statistics and top examples of a layer as map/reduce on a Ray cluster.

The layer's sequences, in prompt order, are cut into ``num_workers`` contiguous ranges of about
equal token counts. Each task opens the store read-only and reduces its range to a mergeable part:
the sums of :class:`~interlatent.db.stats.MomentAccumulator` (count, sum, sum of squares, extremes,
active counts and the masked channel x metric sums behind every correlation), or the best values of
:class:`~interlatent.db.topk.TopK`. The driver merges the parts and writes the rows the
single-process :meth:`~interlatent.db.LatentDB.compute_stats` /
:meth:`~interlatent.db.LatentDB.compute_latent_examples` write: the same fields, statistics equal
up to the order of float64 additions (~1e-12 relative), top examples identical (ties broken by
sequence, then position, in both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interlatent.db import LatentDB
from interlatent.db.stats import MomentAccumulator
from interlatent.db.topk import TopExamples, TopK
from interlatent.distributed.engine import (
    check_workers,
    fetch,
    require_ray,
    split_contiguous,
)
from interlatent.errors import ConfigError


def _parts(db_path: str | Path, layer: str, num_workers: int) -> tuple[str, int, list[list[int]]]:
    """The layer's stored name, its width, and its sequence ids cut into contiguous prompt ranges."""
    with LatentDB(db_path, mode="r") as db:
        info = db.layer_info(layer)
        rows = db._layer_rows(info)
    seq_ids = [r.seq_id for r in rows]
    return info.name, info.width, [seq_ids[s] for s in split_contiguous([r.n_positions for r in rows], num_workers)]


def _stats_part(db_path: str, layer: str, seq_ids: list[int], chunk_tokens: int) -> tuple[list[str], MomentAccumulator]:
    with LatentDB(db_path, mode="r") as db:
        inputs = db._stats_inputs()
        return inputs.metric_labels, db._accumulate_stats(db.layer_info(layer), seq_ids, inputs, chunk_tokens)


def _top_part(db_path: str, layer: str, seq_ids: list[int], top: int, chunk_tokens: int) -> TopExamples:
    with LatentDB(db_path, mode="r") as db:
        return db._mine_examples(db.layer_info(layer), seq_ids, top, chunk_tokens)


def _task(ray: Any, fn: Any, options: dict[str, Any] | None) -> Any:
    return ray.remote(**(options or {"num_cpus": 1}))(fn)


def compute_stats_distributed(db_path: str | Path, layer: str, *, num_workers: int = 2, min_count: int = 5,
                              chunk_tokens: int = 16_384, worker_options: dict[str, Any] | None = None) -> int:
    """:meth:`LatentDB.compute_stats` of one layer, its sequences split over ``num_workers`` Ray tasks.

    ``db_path`` is the store's path (or ``sqlite:///`` URI), which every worker must be able to open
    (one machine, or a shared filesystem). Writes the layer's ``stats`` and ``correlations`` rows
    as ``compute_stats`` does; returns the number of channels stored."""
    check_workers(num_workers)
    ray = require_ray()
    name, _, parts = _parts(db_path, layer, num_workers)
    task = _task(ray, _stats_part, worker_options)
    found = fetch(ray, [task.remote(str(db_path), name, part, chunk_tokens) for part in parts], "statistics")
    with LatentDB(db_path) as db:
        info = db.layer_info(name)
        labels = db._stats_inputs().metric_labels
        total = MomentAccumulator(info.width, len(labels))
        for part_labels, acc in found:
            if part_labels != labels:
                raise ConfigError(f"the store's metrics or label classes changed while the statistics of {name!r} "
                                  f"were computed ({part_labels} in a worker, now {labels}); run it again")
            total.merge(acc)
        return db._store_stats(info, total, labels, min_count)


def top_examples_distributed(db_path: str | Path, layer: str, *, top: int = 32, num_workers: int = 2,
                             chunk_tokens: int = 8192, worker_options: dict[str, Any] | None = None) -> int:
    """:meth:`LatentDB.compute_latent_examples` of one layer, its sequences split over ``num_workers``
    Ray tasks: the ``top`` highest activating (prompt, position, value) of every channel, ties by
    sequence then position. Returns the number of example rows written."""
    check_workers(num_workers)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive int, got {top!r}")
    ray = require_ray()
    name, width, parts = _parts(db_path, layer, num_workers)
    task = _task(ray, _top_part, worker_options)
    best = TopK(width, top)
    for found in fetch(ray, [task.remote(str(db_path), name, part, top, chunk_tokens) for part in parts],
                       "top-example"):
        best.add_examples(found)
    with LatentDB(db_path) as db:
        return db._store_examples(db.layer_info(name), best.result())
