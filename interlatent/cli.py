"""The ``interlatent`` console script: one entry point, a subcommand per tool.

Only the chosen subcommand's module is imported (and that module imports only what it needs), so
``interlatent --help`` and the reading commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from interlatent import __version__

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("interlatent.vis.summary", "runs, layers, artifacts and stats of a store"),
    "search": ("interlatent.vis.search", "top activations, filtered by token / prompt / label"),
    "plot": ("interlatent.vis.plot", "per-token trace or heatmap of channels over one prompt (PNG)"),
    "diff": ("interlatent.vis.diff", "channel means between two groups of prompts, with effect sizes"),
    "dashboard": ("interlatent.vis.dashboard", "a self-contained offline HTML report of a store"),
    "eval": ("interlatent.vis.eval", "SAEBench-parity core metrics of a store's dictionaries on their model"),
    "attribute": ("interlatent.vis.attribute", "recorded attribution scores: the latents that move a metric most"),
    "export": ("interlatent.vis.transfer", "copy a store into a new one with Parquet activation shards, or a SAELens cache"),
    "import": ("interlatent.vis.transfer", "copy a store into a new one with SQLite blobs, or add a SAELens cache"),
}


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit code 2:
    ``error: <what> (see <prog> --help)``. Its subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; subcommand arguments are filled in only for ``command`` (the one being run)."""
    parser = UsageParser(prog="interlatent", description="Interlatent command-line tools.")
    parser.add_argument("--version", action="version", version=f"interlatent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error "
                        "(also INTERLATENT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == command:
            mod = importlib.import_module(module)
            p = sub.add_parser(name, help=help_text, description=mod.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as interlatent --debug")
            p.set_defaults(_run=mod.run, _parser=p)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser, whose help lists what it takes
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from interlatent.vis._cli import guarded

    return guarded(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
