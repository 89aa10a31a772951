"""The search index: what it costs at write time and what it saves at query time.

Writes ``--tokens`` tokens x 256 channels (float16, prompts of 128 tokens, 32 prompts per write)
through the public write API into a store that keeps the search index, while the first
``--write-tokens`` of them also go, batch for batch and interleaved, into a store whose writer skips
the index (its hook made a no-op here, for the comparison only): the ratio of their write times is
the index's cost. Then ``interlatent search --layer llm.layer.0 --top 20`` runs as a fresh process
(start-up included) answered from the index, and again after the index rows are deleted (the
read-only command then scans every activation, as before the index); each with its peak memory.
Last, ``db.build_index`` on that store: what a store written before the index pays once.

    .venv/bin/python benchmarks/index_bench.py --tokens 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from interlatent import LatentDB
from interlatent.db import SequenceRecord

LENGTH, PER_WRITE, WIDTH = 128, 32, 256


def batches(n_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = [f" w{i}" for i in range(2000)] + [" sky"]
    n_seq = n_tokens // LENGTH
    for b in range(0, n_seq, PER_WRITE):
        recs = []
        for i in range(b, min(b + PER_WRITE, n_seq)):
            ids = rng.integers(0, len(words), LENGTH)
            recs.append(SequenceRecord(ids.tolist(), [words[j] for j in ids], {
                "llm.layer.0": rng.standard_normal((LENGTH, WIDTH)).astype(np.float16)},
                text=f"prompt {i}", label=["a", "b"][i % 2], prompt_index=i))
        yield recs


def write_stores(indexed: Path, plain: Path, n_tokens: int, compare_tokens: int) -> tuple[list[float], list[float]]:
    """Write both stores; per-batch seconds of each over the compared (interleaved) part."""
    with_index, without = [], []
    with LatentDB(indexed, durability="process") as a, LatentDB(plain, durability="process") as b, \
            a.run(model="bench") as run_a, b.run(model="bench") as run_b:
        b._index_block = lambda *args: None  # the comparison store: a writer without the index hook
        written = 0
        for recs in batches(n_tokens):
            compare = written < compare_tokens
            order = (0, 1) if len(with_index) % 2 == 0 else (1, 0)
            for which in order if compare else (0,):
                start = time.perf_counter()
                (run_a if which == 0 else run_b).write(recs)
                if compare:
                    (with_index if which == 0 else without).append(time.perf_counter() - start)
            written += len(recs) * LENGTH
    return with_index, without


def timed(cmd: list[str], repeats: int) -> tuple[list[float], int]:
    """Wall seconds of each run of ``cmd`` as a fresh process, and the peak RSS (KB) over the runs."""
    times, peak = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - start)
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")
        proc.stderr.close()
        peak = max(peak, usage.ru_maxrss)
    return times, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--write-tokens", type=int, default=1_000_000,
                    help="tokens also written without the index, for the write-cost ratio (default 1M)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scan-repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the stores (printed) instead of deleting them")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="index_bench_"))
    indexed, plain = work / "indexed.db", work / "plain.db"
    try:
        start = time.perf_counter()
        with_index, without = write_stores(indexed, plain, args.tokens, min(args.write_tokens, args.tokens))
        built = time.perf_counter() - start
        tokens_per_batch = PER_WRITE * LENGTH
        print(f"== search index: {args.tokens:,} tokens x {WIDTH} channels float16 "
              f"({indexed.stat().st_size / 1e6:.0f} MB, written in {built:.0f}s) ==")
        a, b = statistics.median(with_index), statistics.median(without)
        print(f"write, median per {tokens_per_batch:,}-token batch over {len(without)} interleaved batches: "
              f"with index {a * 1e3:.1f} ms ({tokens_per_batch / a / 1e6:.2f}M tokens/s), "
              f"without {b * 1e3:.1f} ms ({tokens_per_batch / b / 1e6:.2f}M tokens/s); ratio {a / b:.2f}x "
              f"(total {sum(with_index) / sum(without):.2f}x)")
        exe = [sys.executable, "-m", "interlatent.cli", "search", str(indexed), "--layer", "llm.layer.0",
               "--top", "20"]
        floor, floor_peak = timed([sys.executable, "-m", "interlatent.cli", "--help"], args.repeats)
        fast, fast_peak = timed(exe, args.repeats)
        with LatentDB(indexed) as db:
            rows = db._q("SELECT COUNT(*), SUM(LENGTH(data)) FROM search_index")[0]
            with db.atomic() as conn:
                conn.execute("DELETE FROM search_index")
                conn.execute("DELETE FROM search_index_layers")
                conn.execute("DELETE FROM search_index_log")
        slow, slow_peak = timed(exe, args.scan_repeats)
        with LatentDB(indexed) as db:
            start = time.perf_counter()
            db.build_index("llm.layer.0")
            rebuild = time.perf_counter() - start
        for name, t, peak in (("interlatent --help (start-up floor)", floor, floor_peak),
                              ("search --top 20, from the index", fast, fast_peak),
                              ("search --top 20, full scan (no index)", slow, slow_peak)):
            print(f"{name:40s} median {statistics.median(t):.2f}s (min {min(t):.2f}, max {max(t):.2f}), "
                  f"peak RSS {peak / 1024:.0f} MB")
        print(f"index size: {rows[0]} channel rows, {rows[1] / 1e6:.2f} MB; db.build_index of a store written "
              f"before it: {rebuild:.1f}s")
    finally:
        if args.keep:
            print(f"stores kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
