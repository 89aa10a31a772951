"""Top activations of a layer (or every layer with a prefix), filtered by token, prompt and label.

    python -m interlatent.vis.search latents.db --layer-prefix latent: --token-like sky --top 20
    python -m interlatent.vis.search latents.db --layer llm.layer.1 --channel 3 --label calm
"""

from __future__ import annotations

import argparse
import sys

from interlatent.vis import queries
from interlatent.vis._cli import add_db, add_format, emit_rows, main_for, nonnegative_int, open_db, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", help="one layer (negative block indices and raw hook names resolve)")
    where.add_argument("--layer-prefix", help="every layer whose name starts with this, e.g. latent:")
    parser.add_argument("--channel", type=int, nargs="+", help="only these channels / latents")
    parser.add_argument("--token-like", help="the token contains this text: a plain substring, case-insensitive "
                        "(%% and _ are literal characters, not wildcards)")
    parser.add_argument("--prompt-like", help="the prompt contains this text: a plain substring, case-insensitive "
                        "for ASCII letters (%% and _ are literal characters, not wildcards)")
    parser.add_argument("--label", help="the prompt has this label")
    parser.add_argument("--top", type=positive_int, default=20, help="how many activations (default 20)")
    parser.add_argument("--window", type=nonnegative_int, default=6, help="context tokens on each side (default 6)")
    add_format(parser)


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        rows = queries.search_rows(db, layer=args.layer, layer_prefix=args.layer_prefix, channel=args.channel,
                                   token_like=args.token_like, prompt_like=args.prompt_like, label=args.label,
                                   top=args.top, window=args.window)
        emit_rows(rows, queries.SEARCH_COLUMNS, args.format)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.search")


if __name__ == "__main__":
    sys.exit(main())
