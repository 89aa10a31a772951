"""The two activation tiers side by side: write, stream and compute_stats, against a numpy floor.

Writes the same float16 ``[positions, channels]`` blocks into a SQLite-blob store and a Parquet-shard
store (batches of ``--batch`` sequences, one transaction each), then streams the layer back
(``iter_activation_chunks``, in order and shuffled) and runs ``compute_stats``. The floor writes one
``numpy.save`` file per batch and streams them back through ``numpy.load(mmap_mode="r")``. Runs are
interleaved; ratios are medians of per-repeat ratios.

    .venv/bin/python benchmarks/tier_bench.py [--tokens 1048576] [--width 256] [--positions 128]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import fsspec  # noqa: F401  (imported here so the first parquet write does not time the imports)
import numpy as np
import pyarrow.parquet  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
from _timing import describe, header, interleaved, ratio  # noqa: E402

from interlatent import LatentDB  # noqa: E402
from interlatent.db import SequenceRecord  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1 << 20, help="token rows per store (default 1,048,576)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--positions", type=int, default=128, help="positions per sequence")
    ap.add_argument("--batch", type=int, default=64, help="sequences per write (one transaction)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n_seq = max(1, args.tokens // args.positions)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((args.positions, args.width)).astype(np.float16)
    blocks = [np.roll(block, i, axis=0) for i in range(min(n_seq, 64))]  # varied, without 1M x 256 in memory
    ids = list(range(args.positions))
    toks = [f"t{i}" for i in ids]
    work = Path(tempfile.mkdtemp(prefix="tier_bench_"))
    n_tok = n_seq * args.positions
    counter = {"i": 0}
    last: dict[str, Path] = {}

    def drop(name: str) -> None:  # keep one store per tier on disk
        old = last.pop(name, None)
        if old is None:
            return
        if old.is_dir():
            shutil.rmtree(old)
            return
        for p in (old, Path(f"{old}-wal"), Path(f"{old}-shm")):
            p.unlink(missing_ok=True)
        shutil.rmtree(f"{old}.shards", ignore_errors=True)

    def write(tier: str) -> None:
        drop(tier)
        counter["i"] += 1
        path = work / f"{tier}{counter['i']}.db"
        with LatentDB(path, activations=tier, durability="process") as db, db.run(model="bench") as run:
            for b in range(0, n_seq, args.batch):
                run.write([SequenceRecord(ids, toks, {"x": blocks[i % len(blocks)]}, text=f"p{i}")
                           for i in range(b, min(b + args.batch, n_seq))])
        last[tier] = path

    def write_floor() -> None:
        drop("numpy")
        counter["i"] += 1
        folder = work / f"npy{counter['i']}"
        folder.mkdir()
        for b in range(0, n_seq, args.batch):
            np.save(folder / f"{b}.npy", np.concatenate([blocks[i % len(blocks)]
                                                         for i in range(b, min(b + args.batch, n_seq))]))
        last["numpy"] = folder

    header(f"write {n_tok:,} tokens x {args.width} channels (float16)")
    times = interleaved({"sqlite": lambda: write("sqlite"), "parquet": lambda: write("parquet"),
                         "numpy.save": write_floor}, repeats=args.repeats, warmup=0)
    report(times, n_tok)

    def stream(tier: str, shuffle: bool = False) -> None:
        with LatentDB(last[tier], mode="r") as db:
            for _ in db.iter_activation_chunks("x", chunk_size=8192, shuffle=shuffle, seed=0):
                pass

    def stream_floor() -> None:
        for f in sorted(last["numpy"].glob("*.npy")):
            arr = np.load(f, mmap_mode="r")
            for s in range(0, len(arr), 8192):
                np.asarray(arr[s : s + 8192], dtype=np.float32)

    header("stream in prompt order (iter_activation_chunks, float32 chunks of 8192)")
    report(interleaved({"sqlite": lambda: stream("sqlite"), "parquet": lambda: stream("parquet"),
                        "numpy mmap": stream_floor}, repeats=args.repeats), n_tok)
    header("stream shuffled (seeded, buffer of 262,144 tokens)")
    report(interleaved({"sqlite": lambda: stream("sqlite", True), "parquet": lambda: stream("parquet", True)},
                       repeats=args.repeats), n_tok)

    def stats(tier: str) -> None:
        with LatentDB(last[tier]) as db:
            db.compute_stats(min_count=1)

    header("compute_stats")
    report(interleaved({"sqlite": lambda: stats("sqlite"), "parquet": lambda: stats("parquet")},
                       repeats=args.repeats), n_tok)
    sizes = {"sqlite": last["sqlite"].stat().st_size,
             "parquet": last["parquet"].stat().st_size + sum(p.stat().st_size for p in
                                                            Path(f"{last['parquet']}.shards").rglob("*.parquet"))}
    for tier, size in sizes.items():
        print(f"bytes on disk per token ({tier}): {size / n_tok:.1f}  (raw float16 {args.width * 2})")
    shutil.rmtree(work)


def report(times: dict[str, list[float]], n_tok: int) -> None:
    names = list(times)
    for name, t in times.items():
        print(f"  {name:12s} {describe(t)}  {n_tok / np.median(t):>13,.0f} tokens/s")
    floor = names[-1] if len(names) > 2 else None
    print(f"  parquet / sqlite time: {ratio(times, 'parquet', 'sqlite'):.2f}x"
          + (f"   sqlite / {floor}: {ratio(times, 'sqlite', floor):.2f}x   parquet / {floor}: "
             f"{ratio(times, 'parquet', floor):.2f}x" if floor else ""))


if __name__ == "__main__":
    main()
