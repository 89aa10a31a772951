"""The main demo: what the store can show end to end (grows with the toolkit).

Writes labelled synthetic activations with a planted label direction into a fresh SQLite store,
computes per-channel stats and correlations, and prints the channels that track the label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from interlatent import LatentDB
from interlatent.db import SequenceRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db_path = out / "workflow.db"
    db_path.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    direction = np.zeros(16)
    direction[3] = 1.0
    with LatentDB(db_path) as db:
        with db.run(kind="custom", model="synthetic") as run:
            records = []
            for i in range(64):
                label = ["calm", "angry"][i % 2]
                n = int(rng.integers(8, 24))
                acts = rng.standard_normal((n, 16)) + (2.0 if label == "angry" else 0.0) * direction
                records.append(SequenceRecord(
                    token_ids=list(range(n)), tokens=[f"w{j}" for j in range(n)],
                    activations={"llm.layer.0": acts.astype(np.float32)}, text=f"prompt {i}", label=label,
                    metrics={"prompt_label": np.full(n, float(label == "angry"))},
                ))
            run.write(records)
        db.compute_stats(min_count=5)
        print(f"store: {db_path}  layers: {db.layers()}  tokens: {db.n_tokens('llm.layer.0')}")
        blocks = sorted(db.iter_statblocks(layer="llm.layer.0"), key=lambda b: -abs(b.top_correlations[0][1]))
        print("channels most correlated with the label:")
        for sb in blocks[:3]:
            metric, r = sb.top_correlations[0]
            print(f"  channel {sb.channel:2d}  mean {sb.mean:+.3f}  std {sb.std:.3f}  {metric} r={r:+.3f}")


if __name__ == "__main__":
    main()
