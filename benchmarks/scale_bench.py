"""The store at scale: 10M tokens x 256 channels on both activation tiers, against numpy floors.

For each tier (SQLite blobs, Parquet shards) the same float16 ``[positions, channels]`` blocks are
written through the public write API (``run.write``, ``--batch`` sequences per transaction, the
search index kept as they arrive), then:

- write tokens/s against the ``numpy.save`` floor (one file per batch, the same bytes);
- streaming vectors/s (``iter_activation_chunks``, float32 chunks of 8,192) against reading those
  files through ``numpy.load(mmap_mode="r")``, and shuffled streaming with its peak RSS;
- ``compute_stats`` of the layer;
- ``interlatent search --layer llm.layer.0 --top 20`` as a fresh process (start-up included), from
  the search index, with its peak RSS; and once as the full scan the index replaces (``--scan``);
- bytes on disk per token.

With ``--ray``, ``benchmarks/ray_bench.py`` then runs (2 workers against 1 process) and its ratio
lines are printed. Each figure is one timed pass (``--repeats`` more, interleaved across tiers).

    .venv/bin/python benchmarks/scale_bench.py [--tokens 10000000] [--width 256] [--scan] [--ray]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import header  # noqa: E402

from interlatent import LatentDB  # noqa: E402
from interlatent.db import SequenceRecord  # noqa: E402

LAYER = "llm.layer.0"


def blocks_for(n_seq: int, positions: int, width: int, pool: int = 97):
    """``n_seq`` float16 blocks drawn from a pool of random ones, each shifted and scaled by its
    index, so values and their order differ from block to block without 10M x 256 in memory."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((positions, width)).astype(np.float32) for _ in range(pool)]
    for i in range(n_seq):
        yield (np.roll(base[i % pool], i // pool, axis=1) * (1 + (i % 13) / 16)).astype(np.float16)


def write_store(path: Path, tier: str, n_seq: int, args: argparse.Namespace) -> float:
    ids = list(range(args.positions))
    toks = [f" t{i}" for i in ids]
    start = time.perf_counter()
    with LatentDB(path, activations=tier, durability="process") as db, db.run(model="scale_bench") as run:
        batch: list[SequenceRecord] = []
        for i, block in enumerate(blocks_for(n_seq, args.positions, args.width)):
            batch.append(SequenceRecord(ids, toks, {LAYER: block}, text=f"p{i}"))
            if len(batch) == args.batch:
                run.write(batch, layer_meta={LAYER: {"hook_name": "blocks.0.hook_resid_post"}})
                batch = []
        if batch:
            run.write(batch, layer_meta={LAYER: {"hook_name": "blocks.0.hook_resid_post"}})
    return time.perf_counter() - start


def write_floor(folder: Path, n_seq: int, args: argparse.Namespace) -> float:
    folder.mkdir()
    start = time.perf_counter()
    gen = blocks_for(n_seq, args.positions, args.width)
    for b in range(0, n_seq, args.batch):
        np.save(folder / f"{b:09d}.npy", np.concatenate([next(gen) for _ in range(min(args.batch, n_seq - b))]))
    return time.perf_counter() - start


def child(code: str) -> tuple[float, float, str]:
    """Run python ``code`` in a fresh process: (wall seconds, peak RSS MiB, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak = float(proc.stdout.strip().splitlines()[-1])
    return wall, peak, proc.stdout


# the process's own high-water RSS (VmHWM restarts at exec, unlike getrusage's maxrss, which a child
# inherits from the process that started it)
PEAK = ("print([int(line.split()[1]) / 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")


def stream_code(path: Path, shuffle: bool) -> str:
    return (f"from interlatent import LatentDB\nn = 0\nwith LatentDB({str(path)!r}, mode='r') as db:\n"
            f"    for v, _ in db.iter_activation_chunks({LAYER!r}, chunk_size=8192, shuffle={shuffle}, seed=0):\n"
            f"        n += len(v)\nprint(n)\n{PEAK}")


def floor_code(folder: Path) -> str:
    return (f"import numpy as np, pathlib\nn = 0\nfor f in sorted(pathlib.Path({str(folder)!r}).glob('*.npy')):\n"
            "    a = np.load(f, mmap_mode='r')\n    for s in range(0, len(a), 8192):\n"
            "        n += len(np.asarray(a[s:s + 8192], dtype=np.float32))\n"
            f"print(n)\n{PEAK}")


def search(path: Path, scan: bool = False) -> tuple[float, float]:
    """``interlatent search`` top-20 as a fresh process (or the full scan it replaces): seconds, peak MiB."""
    if scan:
        code = (f"from interlatent import LatentDB\nfrom interlatent.vis import queries\n"
                f"with LatentDB({str(path)!r}, mode='r') as db:\n"
                f"    rows = queries.search_rows(db, layer={LAYER!r}, top=20, use_index=False)\n"
                f"print(len(rows))\n{PEAK}")
        wall, peak, _ = child(code)
        return wall, peak
    code = ("import contextlib, io, sys\nfrom interlatent.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main(['search', {str(path)!r}, '--layer', {LAYER!r}, '--top', '20', '--format', 'csv'])\n"
            f"assert rc == 0\n{PEAK}")
    wall, peak, _ = child(code)
    return wall, peak


def disk_bytes(path: Path) -> int:
    total = path.stat().st_size
    shards = Path(f"{path}.shards")
    if shards.exists():
        total += sum(p.stat().st_size for p in shards.rglob("*") if p.is_file())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--positions", type=int, default=128, help="positions per sequence")
    ap.add_argument("--batch", type=int, default=64, help="sequences per write (one transaction)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes of each read (interleaved)")
    ap.add_argument("--scan", action="store_true", help="also time the full-scan search the index replaces")
    ap.add_argument("--ray", action="store_true", help="also run benchmarks/ray_bench.py (2 workers vs 1 process)")
    ap.add_argument("--workdir", help="where the stores go (default: a temp folder, removed after)")
    args = ap.parse_args()
    n_seq = max(1, args.tokens // args.positions)
    n_tok = n_seq * args.positions
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"sqlite": work / "sqlite.db", "parquet": work / "parquet.db"}
    floor = work / "npy"
    try:
        header(f"write {n_tok:,} tokens x {args.width} channels (float16), {args.batch} sequences per write")
        t_floor = write_floor(floor, n_seq, args)
        print(f"  numpy.save floor  {t_floor:8.1f} s  {n_tok / t_floor:>12,.0f} tokens/s")
        for tier, path in paths.items():
            t = write_store(path, tier, n_seq, args)
            print(f"  {tier:16s}  {t:8.1f} s  {n_tok / t:>12,.0f} tokens/s   {t / t_floor:.2f}x the floor's time")
        size_floor = sum(p.stat().st_size for p in floor.glob("*.npy"))
        for tier, path in paths.items():
            print(f"  bytes on disk per token ({tier}): {disk_bytes(path) / n_tok:.1f}  "
                  f"(numpy files {size_floor / n_tok:.1f}, raw float16 {args.width * 2})")

        header("stream (iter_activation_chunks, float32 chunks of 8,192; a fresh process each)")
        runs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for name, code in (("numpy mmap", floor_code(floor)),
                               *((f"{t}", stream_code(p, False)) for t, p in paths.items()),
                               *((f"{t} shuffled", stream_code(p, True)) for t, p in paths.items())):
                wall, peak, _ = child(code)
                runs.setdefault(name, []).append((wall, peak))
        base = statistics.median(w for w, _ in runs["numpy mmap"])
        for name, vals in runs.items():
            wall = statistics.median(w for w, _ in vals)
            print(f"  {name:18s} {wall:8.2f} s  {n_tok / wall:>12,.0f} vectors/s  {wall / base:5.2f}x the mmap "
                  f"read's time  peak RSS {max(p for _, p in vals):,.0f} MiB")

        header("compute_stats (every channel of the layer)")
        for tier, path in paths.items():
            with LatentDB(path) as db:
                start = time.perf_counter()
                db.compute_stats(min_count=1, layers=[LAYER])
                t = time.perf_counter() - start
            print(f"  {tier:8s} {t:8.2f} s  {n_tok / t:>12,.0f} tokens/s")

        header("interlatent search --layer llm.layer.0 --top 20 (a fresh process: start-up included)")
        for tier, path in paths.items():
            got = [search(path) for _ in range(max(3, args.repeats))]
            wall = statistics.median(w for w, _ in got)
            print(f"  {tier:8s} from the index  {wall:6.2f} s  peak RSS {max(p for _, p in got):,.0f} MiB")
        if args.scan:
            for tier, path in paths.items():
                wall, peak = search(path, scan=True)
                print(f"  {tier:8s} full scan       {wall:6.2f} s  peak RSS {peak:,.0f} MiB")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    if args.ray:
        header("Ray: 2 workers against 1 process (benchmarks/ray_bench.py)")
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "ray_bench.py"), "--workers", "2"],
                             capture_output=True, text=True, check=True).stdout
        print("\n".join("  " + line for line in out.splitlines() if line.strip()))


if __name__ == "__main__":
    main()
