"""The Ray engine against one process: collection, statistics and top examples, and how it would scale.

The model of ``collect_bench.py`` (4 layers, d_model 256, random init, vocab 4,096), one layer
stored (float16). One process: ``LLMCollector``, ``db.compute_stats``, ``db.compute_latent_examples``.
Ray: ``collect_distributed`` on a warm ``ReplicaPool`` of ``--workers`` replicas (their start-up is
timed apart), ``compute_stats_distributed`` and ``top_examples_distributed``; interleaved A B A B.
The driver's share (writing the records the workers return) is timed too: with N workers on N free
cores, collection would run at about min(N x per-worker rate, the driver's write rate). The parquet
row collects into a parquet-tier store, where the workers write the shard files themselves and the
driver commits only the catalog (its share timed the same way).

    .venv/bin/python benchmarks/ray_bench.py [--prompts 32] [--tokens 64] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import describe, header, interleaved, ratio
from collect_bench import build

from interlatent import LatentDB, LLMCollector
from interlatent.distributed import (
    ReplicaPool,
    ReturnRecords,
    WriteShards,
    collect_distributed,
    compute_stats_distributed,
    top_examples_distributed,
)


class TimedRecords(ReturnRecords):
    """Records back to the driver, with the driver's time spent writing them."""

    seconds = 0.0

    def commit(self, run: Any, payload: Any, **write_options: Any) -> None:
        start = time.perf_counter()
        super().commit(run, payload, **write_options)
        TimedRecords.seconds += time.perf_counter() - start


class TimedShards(WriteShards):
    """The workers write the shards; the driver's time spent committing their manifests."""

    seconds = 0.0

    def commit(self, run: Any, payload: Any, **write_options: Any) -> None:
        start = time.perf_counter()
        super().commit(run, payload, **write_options)
        TimedShards.seconds += time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (BOS included)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    model, tok = build(4096, args.tokens)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{t}" for t in rng.integers(0, 4000, args.tokens - 1)) for _ in range(args.prompts)]
    n_tok = args.prompts * args.tokens
    work = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    counter = {"i": 0}
    settings = {"layer_indices": [1], "batch_size": args.batch, "show_progress": False}

    def fresh() -> Path:
        counter["i"] += 1
        return work / f"c{counter['i']}.db"

    start = time.perf_counter()
    pool = ReplicaPool(model, tok, num_workers=args.workers)
    with LatentDB(fresh()) as db:  # the first run builds the replicas (ships the model, imports torch)
        collect_distributed(pool, None, db, prompts[:1], **settings)
    startup = time.perf_counter() - start

    def one_process() -> None:
        with LatentDB(fresh()) as db:
            LLMCollector(db, layer_indices=[1], batch_size=args.batch).run(model, tok, prompts=prompts,
                                                                           show_progress=False)

    def distributed() -> None:
        with LatentDB(fresh()) as db:
            collect_distributed(pool, None, db, prompts, sink=TimedRecords(), **settings)

    def distributed_parquet() -> None:
        with LatentDB(fresh(), activations="parquet") as db:
            collect_distributed(pool, None, db, prompts, sink=TimedShards(), **settings)

    header(f"collection, {n_tok} tokens, 4 layers d_model 256, {args.workers} Ray workers")
    print(f"replica start-up (once per pool): {startup:.1f} s")
    times = interleaved({"1 process": one_process, "ray": distributed, "ray parquet": distributed_parquet},
                        repeats=args.repeats)
    for name, t in times.items():
        print(f"{name:12s} {describe(t)}  {n_tok / np.median(t):,.0f} tokens/s")
    overhead = ratio(times, "ray", "1 process")
    per_worker = n_tok / np.median(times["ray"]) / args.workers
    writes = TimedRecords.seconds / ((1 + args.repeats) * n_tok)  # warm-up + repeats
    commits = TimedShards.seconds / ((1 + args.repeats) * n_tok)
    print(f"ray / 1 process: {overhead:.2f}x wall time on {args.workers} shared cores "
          f"(parquet, workers writing the shards: {ratio(times, 'ray parquet', '1 process'):.2f}x)")
    print(f"how it would scale: N workers x {per_worker:,.0f} tokens/s per worker, until the driver's writes "
          f"cap it at {1 / writes:,.0f} tokens/s (e.g. 8 workers ~ {min(8 * per_worker, 1 / writes):,.0f} tokens/s); "
          f"committing the workers' shards instead caps it at {1 / commits:,.0f} tokens/s")

    db_path = fresh()
    with LatentDB(db_path) as db:
        LLMCollector(db, layer_indices=[1], batch_size=args.batch).run(model, tok, prompts=prompts,
                                                                       show_progress=False)
    pool.close()
    copies = [shutil.copy(db_path, work / f"s{i}.db") for i in range(2)]

    def stats_one() -> None:
        with LatentDB(copies[0]) as db:
            db.compute_stats(layers=["llm.layer.1"])

    def stats_ray() -> None:
        compute_stats_distributed(copies[1], "llm.layer.1", num_workers=args.workers)

    def top_one() -> None:
        with LatentDB(copies[0]) as db:
            db.compute_latent_examples("llm.layer.1")

    def top_ray() -> None:
        top_examples_distributed(copies[1], "llm.layer.1", num_workers=args.workers)

    header(f"statistics and top examples, {n_tok} tokens x 256 channels")
    times = interleaved({"stats 1 process": stats_one, "stats ray": stats_ray, "top 1 process": top_one,
                         "top ray": top_ray}, repeats=args.repeats)
    for name, t in times.items():
        print(f"{name:16s} {describe(t)}  {n_tok / np.median(t):,.0f} tokens/s")
    print(f"stats ray / 1 process: {ratio(times, 'stats ray', 'stats 1 process'):.2f}x; "
          f"top ray / 1 process: {ratio(times, 'top ray', 'top 1 process'):.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
