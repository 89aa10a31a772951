"""Store ingest vs the numpy.save floor, and bytes on disk per token per layer.

Writes the same float16 [positions, channels] arrays (with their token rows) through LatentDB and
with numpy.save to one file per sequence, interleaved, and prints the median ratio.

    .venv/bin/python benchmarks/store_bench.py [--sequences 256] [--positions 64] [--width 256]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import describe, header, interleaved, ratio  # noqa: E402

from interlatent import LatentDB  # noqa: E402
from interlatent.db import SequenceRecord  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="sequences per write (one transaction)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((args.positions, args.width)).astype(np.float16) for _ in range(args.sequences)]
    token_ids = [rng.integers(0, 4096, args.positions).tolist() for _ in range(args.sequences)]
    tokens = [[f"tok{t}" for t in ids] for ids in token_ids]
    work = Path(tempfile.mkdtemp(prefix="store_bench_"))
    counter = {"i": 0}

    def store(durability: str = "full") -> None:
        counter["i"] += 1
        path = work / f"s{counter['i']}.db"
        with LatentDB(path, durability=durability) as db, db.run(model="bench") as run:
            for b in range(0, args.sequences, args.batch):
                run.write([SequenceRecord(token_ids[i], tokens[i], {"llm.layer.0": arrays[i]}, text=f"p{i}")
                           for i in range(b, min(b + args.batch, args.sequences))])

    def numpy_floor() -> None:
        counter["i"] += 1
        folder = work / f"n{counter['i']}"
        folder.mkdir()
        for i, arr in enumerate(arrays):
            np.save(folder / f"{i}.npy", arr)

    header("store ingest")
    times = interleaved({"LatentDB (durability=full)": store, "LatentDB (durability=process)":
                         lambda: store("process"), "numpy.save": numpy_floor}, repeats=args.repeats)
    n_tok = args.sequences * args.positions
    for name, t in times.items():
        print(f"{name:30s} {describe(t)}  {n_tok / np.median(t):,.0f} tokens/s")
    for name in ("LatentDB (durability=full)", "LatentDB (durability=process)"):
        print(f"ingest throughput {name} / numpy floor: {ratio(times, 'numpy.save', name):.2f}x  (target >= 0.5x)")
    print("(numpy.save does not sync to disk either: durability=process is the like-for-like row; "
          "durability=full waits for the disk at WAL checkpoints)")
    last = work / f"s{counter['i'] - 1}.db"
    size = last.stat().st_size
    raw = n_tok * args.width * 2
    meta = sum(len(t) for seq in tokens for t in seq) + n_tok * 8  # token text + id/position ints
    print(f"bytes on disk per token per layer: {size / n_tok:.1f}  (raw float16 {args.width * 2}, "
          f"size / (raw + token metadata) = {size / (raw + meta):.3f}, target <= 1.1)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
