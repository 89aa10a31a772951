"""Summarise a store: runs, layers (counts, widths, dtypes), artifacts and their metrics, stats.

    python -m interlatent.vis.summary latents.db
    python -m interlatent.vis.summary latents.db --list-layers --layer-prefix latent:
    python -m interlatent.vis.summary latents.db --stats latent_sae:llm.layer.1 --top 10
    python -m interlatent.vis.summary latents.db --examples llm.layer.1 --channel 3 --top 5
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from interlatent.vis import queries
from interlatent.vis._cli import add_db, add_format, emit, emit_many, main_for, open_db, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("--list-layers", action="store_true", help="only the layers table")
    parser.add_argument("--layer-prefix", help="only layers whose name starts with this (e.g. latent:)")
    parser.add_argument("--stats", metavar="LAYER", help="per-channel stats of LAYER (after db.compute_stats)")
    parser.add_argument("--examples", metavar="LAYER", help="each channel's top activating tokens of LAYER (stored "
                        "examples or the search index)")
    parser.add_argument("--channel", type=int, nargs="+", help="with --examples: only these channels")
    parser.add_argument("--top", type=positive_int, default=20, help="rows of --stats, or examples per channel of "
                        "--examples, to show (default 20)")
    add_format(parser)


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        layers = queries.layers_table(db, args.layer_prefix)
        if args.list_layers:
            emit(layers, args.format, empty="no layers match")
            return 0
        if args.examples:
            examples = queries.examples_table(db, args.examples, channel=args.channel, top=args.top)
            emit(examples, args.format, empty=f"no activations stored for {args.examples}")
            return 0
        if args.stats:
            stats = queries.stats_table(db, args.stats, top=args.top)
            emit(stats, args.format, empty=f"no stats for {args.stats}: run db.compute_stats() first")
            return 0
        counts = pd.DataFrame([queries.counts(db)])
        emit_many({"store": counts, "runs": queries.runs_table(db), "layers": layers,
                   "artifacts": queries.artifacts_table(db)}, args.format)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.summary")


if __name__ == "__main__":
    sys.exit(main())
