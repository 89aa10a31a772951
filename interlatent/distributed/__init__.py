"""Ray as the distributed engine: collection with model replicas in an actor pool, statistics and
top-example mining as map/reduce. Ray is imported when a job starts; install it with
``pip install 'interlatent-toolkit[ray]'``. Only the calling process (the driver) writes the store.
"""

from interlatent.distributed.collect import (
           RecordSink,
           ReplicaPool,
           ReturnRecords,
           collect_distributed,
)
from interlatent.distributed.mapreduce import (
           compute_stats_distributed,
           top_examples_distributed,
)

__all__ = ["RecordSink", "ReplicaPool", "ReturnRecords", "collect_distributed", "compute_stats_distributed",
           "top_examples_distributed"]
