"""Ray as the distributed engine: collection with model replicas in an actor pool, statistics and
top-example mining as map/reduce. Ray is imported when a job starts; install it with
``pip install 'interlatent-toolkit[ray]'``. Only the calling process (the driver) writes the
store's catalog; collection workers may write the shard files of a parquet-tier store.

The parts load lazily, so the map/reduce workers import the store and numpy, not torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RecordSink": "interlatent.distributed.collect",
    "ReplicaPool": "interlatent.distributed.collect",
    "ReturnRecords": "interlatent.distributed.collect",
    "WriteShards": "interlatent.distributed.collect",
    "collect_distributed": "interlatent.distributed.collect",
    "compute_stats_distributed": "interlatent.distributed.mapreduce",
    "top_examples_distributed": "interlatent.distributed.mapreduce",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interlatent.distributed' has no attribute {name!r}")
