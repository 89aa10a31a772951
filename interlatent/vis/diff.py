"""Latent means between two groups of prompts, with effect sizes (difference, standardized difference).

    python -m interlatent.vis.diff latents.db --layer-prefix latent: --channels 0 1 --prompt-like-a A --prompt-like-b B
    python -m interlatent.vis.diff latents.db --layer llm.layer.1 --label-a calm --label-b angry --top 10
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from interlatent.vis import queries
from interlatent.vis._cli import add_db, add_format, emit, main_for, open_db, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", help="one layer")
    where.add_argument("--layer-prefix", help="every layer whose name starts with this, e.g. latent:")
    parser.add_argument("--channels", type=int, nargs="+", help="only these channels (default: all)")
    parser.add_argument("--prompt-like-a", help="group A: prompts containing this text, a plain substring, "
                        "case-insensitive for ASCII letters (%% and _ are literal characters, not wildcards)")
    parser.add_argument("--prompt-like-b", help="group B: prompts containing this text, a plain substring, "
                        "case-insensitive for ASCII letters (%% and _ are literal characters, not wildcards)")
    parser.add_argument("--label-a", help="group A: prompts with this label")
    parser.add_argument("--label-b", help="group B: prompts with this label")
    parser.add_argument("--top", type=positive_int, help="only the N largest |standardized differences| per layer")
    add_format(parser)


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        frames = []
        for name in queries.select_layers(db, args.layer, args.layer_prefix):
            df = queries.diff(db, name, channels=args.channels, prompt_like_a=args.prompt_like_a,
                              prompt_like_b=args.prompt_like_b, label_a=args.label_a, label_b=args.label_b,
                              top=args.top)
            df.insert(0, "layer", name)
            frames.append(df)
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if not out.empty and (out["n_a"].iloc[0] == 0 or out["n_b"].iloc[0] == 0):
            out = out.iloc[0:0]
        emit(out, args.format, empty="no matches: a group has no tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.diff")


if __name__ == "__main__":
    sys.exit(main())
