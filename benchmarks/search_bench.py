"""Search and dashboard build, timed as whole commands (start-up included).

Builds a store of >= 100,000 tokens x 256 channels (float16) plus a 2,048-latent sparse layer, then
times ``interlatent search ... --top 20`` as a process (median of runs) and ``interlatent dashboard``
for the 2,048 latents.

    .venv/bin/python benchmarks/search_bench.py [--tokens 102400]

With ``--token-index``, only ``search --token-like`` is timed (the store without the sparse layer),
for a frequent text (`` w1``: about half the tokens), the medium `` sky`` (1 token in 2,001) and a
rare one (`` zebra``: one token in every 997th prompt), each answered with the store's indexes and,
interleaved, on a copy whose search and token indexes are unusable to a read-only command (it then
scans as before them: SQL LIKE over every sequence's token list, then every candidate's block).

    .venv/bin/python benchmarks/search_bench.py --token-index --tokens 1000000
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs


def build(path: Path, n_tokens: int, length: int = 128, sparse: bool = True) -> None:
    rng = np.random.default_rng(0)
    words = [f" w{i}" for i in range(2000)] + [" sky"]
    with LatentDB(path) as db, db.run(model="bench") as run:
        n_seq = n_tokens // length
        for b in range(0, n_seq, 32):
            recs = []
            for i in range(b, min(b + 32, n_seq)):
                ids = rng.integers(0, len(words), length)
                texts = [words[j] for j in ids]
                if i % 997 == 500:
                    texts[7] = " zebra"
                acts = {"llm.layer.0": rng.standard_normal((length, 256)).astype(np.float32)}
                if sparse:
                    idx = np.stack([rng.choice(2048, 16, replace=False) for _ in range(length)])
                    acts["latent:llm.layer.0"] = SparseActs(idx, rng.random((length, 16)).astype(np.float32), 2048)
                recs.append(SequenceRecord(ids.tolist(), texts, acts, text=f"prompt {i}", label=["a", "b"][i % 2],
                                           prompt_index=i))
            run.write(recs)
        if sparse:
            db.compute_latent_examples("latent:llm.layer.0", top=16)


def without_indexes(path: Path, copy: Path) -> None:
    """A copy of the store whose search and token indexes a read-only command cannot use."""
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy)
    with conn:
        for table in ("search_index", "search_index_layers", "search_index_log"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("INSERT INTO token_index_pending(seq_id) SELECT seq_id FROM tokens")
    conn.close()


def token_index_rows(work: Path, db: Path, repeats: int) -> None:
    plain = work / "plain.db"
    without_indexes(db, plain)
    exe = [sys.executable, "-m", "interlatent.cli", "search"]
    for needle in (" w1", " sky", " zebra"):
        times: dict[str, list[float]] = {"indexes": [], "scan": []}
        for _ in range(repeats):  # interleaved
            for name, path in (("indexes", db), ("scan", plain)):
                times[name] += timed([*exe, str(path), "--layer", "llm.layer.0", "--token-like", needle, "--top", "20"],
                                     1)
        out = subprocess.run([*exe, str(db), "--layer", "llm.layer.0", "--token-like", needle, "--top", "20",
                              "--format", "json"], check=True, capture_output=True).stdout
        same = out == subprocess.run([*exe, str(plain), "--layer", "llm.layer.0", "--token-like", needle, "--top",
                                      "20", "--format", "json"], check=True, capture_output=True).stdout
        print(f"search --token-like {needle!r:9s} indexes median {statistics.median(times['indexes']):.2f}s  "
              f"scan median {statistics.median(times['scan']):.2f}s  "
              f"({statistics.median(s / i for s, i in zip(times['scan'], times['indexes'])):.1f}x; "
              f"same rows: {same})")
    floor = timed([sys.executable, "-m", "interlatent.cli", "--help"], repeats)
    print(f"interlatent --help (start-up floor) median {statistics.median(floor):.2f}s")


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=102_400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--token-index", action="store_true",
                    help="time only --token-like searches, with the indexes and without them")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="search_bench_"))
    db = work / "bench.db"
    start = time.perf_counter()
    build(db, args.tokens, sparse=not args.token_index)
    if args.token_index:
        print(f"== search --token-like: {args.tokens:,} tokens x 256 channels ({db.stat().st_size / 1e6:.0f} MB, "
              f"built in {time.perf_counter() - start:.0f}s) ==")
        token_index_rows(work, db, args.repeats)
        shutil.rmtree(work)
        return
    print(f"== search / dashboard: {args.tokens:,} tokens x 256 channels + 2,048 sparse latents "
          f"({db.stat().st_size / 1e6:.0f} MB, built in {time.perf_counter() - start:.0f}s) ==")
    exe = [sys.executable, "-m", "interlatent.cli"]
    rows = {
        "search --layer llm.layer.0 --top 20": [*exe, "search", str(db), "--layer", "llm.layer.0", "--top", "20"],
        "search --layer llm.layer.0 --token-like sky --top 20": [*exe, "search", str(db), "--layer", "llm.layer.0",
                                                                 "--token-like", "sky", "--top", "20"],
        "search --layer-prefix latent: --top 20": [*exe, "search", str(db), "--layer-prefix", "latent:", "--top", "20"],
        "interlatent --help (start-up floor)": [*exe, "--help"],
    }
    for name, cmd in rows.items():
        t = timed(cmd, args.repeats)
        print(f"{name:55s} median {statistics.median(t):.2f}s (min {min(t):.2f}, max {max(t):.2f})"
              + ("" if "help" in name else "  (target < 1 s)"))
    t = timed([*exe, "dashboard", str(db), "-o", str(work / "r.html"), "--layer", "latent:llm.layer.0"], 1)
    size = (work / "r.html").stat().st_size
    print(f"dashboard for 2,048 latents: {t[0]:.1f}s  (target < 30 s), {size / 1e6:.1f} MB = "
          f"{size / 2048 / 1e3:.1f} KB per latent")


if __name__ == "__main__":
    main()
