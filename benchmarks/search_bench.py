"""Search and dashboard build, timed as whole commands (start-up included).

Builds a store of >= 100,000 tokens x 256 channels (float16) plus a 2,048-latent sparse layer, then
times ``interlatent search ... --top 20`` as a process (median of runs) and ``interlatent dashboard``
for the 2,048 latents.

    .venv/bin/python benchmarks/search_bench.py [--tokens 102400]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs


def build(path: Path, n_tokens: int, length: int = 128) -> None:
    rng = np.random.default_rng(0)
    words = [f" w{i}" for i in range(2000)] + [" sky"]
    with LatentDB(path) as db, db.run(model="bench") as run:
        n_seq = n_tokens // length
        for b in range(0, n_seq, 32):
            recs = []
            for i in range(b, min(b + 32, n_seq)):
                ids = rng.integers(0, len(words), length)
                idx = np.stack([rng.choice(2048, 16, replace=False) for _ in range(length)])
                recs.append(SequenceRecord(ids.tolist(), [words[j] for j in ids], {
                    "llm.layer.0": rng.standard_normal((length, 256)).astype(np.float32),
                    "latent:llm.layer.0": SparseActs(idx, rng.random((length, 16)).astype(np.float32), 2048)},
                    text=f"prompt {i}", label=["a", "b"][i % 2], prompt_index=i))
            run.write(recs)
        db.compute_latent_examples("latent:llm.layer.0", top=16)


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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="search_bench_"))
    db = work / "bench.db"
    start = time.perf_counter()
    build(db, args.tokens)
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
