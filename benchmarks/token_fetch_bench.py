"""``fetch_activations(token_like=...)`` with the token index and without it, in one process.

Builds a store of ``--tokens`` tokens (prompts of 128 tokens, one float16 layer of 64 channels;
vocabulary: 2,000 words, the medium `` sky`` (1 token in 2,001) and the rare `` zebra`` (one token
in every 997th prompt)) and a copy whose token index a read-only open cannot use (every sequence
left pending: the fetch then scans every token list, as before the index answered it). Times the
fetch of each word on both, interleaved, and checks that they return the same rows and values.

    .venv/bin/python benchmarks/token_fetch_bench.py --tokens 1000000

``--store DIR`` keeps the two stores in DIR (built when missing), so the same files can be timed
with another checkout of the library (whose path is printed).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

import interlatent
from interlatent import LatentDB
from interlatent.db import SequenceRecord

from _timing import describe, header, interleaved, ratio

NEEDLES = (" zebra", " sky", " w1")


def build(path: Path, n_tokens: int, length: int = 128, width: int = 64) -> None:
    rng = np.random.default_rng(0)
    words = [f" w{i}" for i in range(2000)] + [" sky"]
    with LatentDB(path, durability="process") as db, db.run(model="bench") as run:
        n_seq = n_tokens // length
        for b in range(0, n_seq, 64):
            recs = []
            for i in range(b, min(b + 64, n_seq)):
                ids = rng.integers(0, len(words), length)
                texts = [words[j] for j in ids]
                if i % 997 == 500:
                    texts[7] = " zebra"
                recs.append(SequenceRecord(ids.tolist(), texts,
                                           {"L": rng.standard_normal((length, width)).astype(np.float32)},
                                           text=f"prompt {i}", prompt_index=i))
            run.write(recs, dtypes={"L": "float16"})


def unindexed_copy(path: Path, copy: Path) -> None:
    """A copy whose token index is not current: every sequence waits in ``token_index_pending``."""
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy)
    with conn:
        conn.execute("INSERT OR IGNORE INTO token_index_pending(seq_id) SELECT seq_id FROM tokens")
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store", type=Path, default=None, help="folder keeping the two stores between runs")
    ap.add_argument("--needles", nargs="+", default=list(NEEDLES), help="the token texts to fetch")
    args = ap.parse_args()
    work = args.store or Path("/tmp/token_fetch_bench")
    work.mkdir(parents=True, exist_ok=True)
    indexed, plain = work / "indexed.db", work / "plain.db"
    if not indexed.exists():
        start = time.perf_counter()
        build(indexed, args.tokens)
        unindexed_copy(indexed, plain)
        print(f"built {args.tokens:,} tokens ({indexed.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.0f}s")
    header(f"fetch_activations(token_like=...) on {indexed}, library {Path(interlatent.__file__).parent}")
    with LatentDB(indexed, mode="r") as a, LatentDB(plain, mode="r") as b:
        for needle in args.needles:
            fns = {"indexed": lambda: a.fetch_activations("L", token_like=needle),
                   "scan": lambda: b.fetch_activations("L", token_like=needle)}
            times = interleaved(fns, repeats=args.repeats)
            x, y = fns["indexed"](), fns["scan"]()
            same = x.tokens.equals(y.tokens) and np.array_equal(x.values, y.values)
            print(f"{needle!r:9s} {len(x.tokens):7d} rows  indexed {describe(times['indexed'])}  "
                  f"scan {describe(times['scan'])}  scan/indexed {ratio(times, 'scan', 'indexed'):.1f}x  same: {same}")


if __name__ == "__main__":
    main()
