"""Convert a store between activation tiers, losslessly: every table, every block bit-exact.

    interlatent export latents.db big.db                          # SQLite blobs -> Parquet shards
    interlatent export latents.db big.db --shard-root /data/big.shards --force
    interlatent import big.db small.db                            # Parquet shards -> SQLite blobs
    python -m interlatent.vis.transfer export latents.db big.db --activations parquet

Both create DEST (refused if it exists, unless --force replaces it) and never change SRC. ``export``
writes Parquet shards by default, ``import`` SQLite blobs; ``--activations`` picks either. The
shards go to ``DEST.shards`` beside DEST unless ``--shard-root`` names a folder or an fsspec URL.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple

from interlatent.vis._cli import add_debug, guarded

TIERS = ("parquet", "sqlite")
DEFAULT_TIER = {"export": "parquet", "import": "sqlite"}


class TransferPlan(NamedTuple):
    """What one command asks for: the kind of transfer, its source and destination, and options.

    ``kind`` is ``"tier"`` (a store to a store in another activation tier); another kind (an external
    activation cache) is planned by :func:`plan` and carried out by :func:`convert` alike."""

    kind: str
    src: str
    dst: str
    activations: str
    shard_root: str | None
    force: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the store to read (path.db); it must exist and is not changed")
    parser.add_argument("dst", metavar="DEST", help="the store to create (path.db)")
    parser.add_argument("--activations", choices=TIERS, default=None,
                        help="where DEST keeps its activations: parquet shards or sqlite blobs (default: parquet "
                             "for export, sqlite for import)")
    parser.add_argument("--shard-root", default=None,
                        help="DEST's shard folder or fsspec URL (default: DEST.shards beside DEST)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")


def plan(args: argparse.Namespace) -> TransferPlan:
    """The transfer the parsed arguments ask for; a contradiction is a usage error (exit 2)."""
    command = getattr(args, "command", None) or "export"
    activations = args.activations or DEFAULT_TIER[command]
    if activations == "sqlite" and args.shard_root is not None:
        parser = getattr(args, "_parser", None)
        message = "--shard-root is for --activations parquet; sqlite blobs need no shard folder"
        if parser is not None:
            parser.error(message)
        raise SystemExit(2)
    return TransferPlan("tier", args.src, args.dst, activations, args.shard_root, bool(args.force))


def convert(job: TransferPlan) -> Any:
    """Carry out a plan; returns what the conversion reports."""
    from interlatent.db.transfer import convert_store

    return convert_store(job.src, job.dst, activations=job.activations, shard_root=job.shard_root, force=job.force)


def run(args: argparse.Namespace) -> int:
    done = convert(plan(args))
    where = f" (shards under {done.shard_root})" if done.shard_root else ""
    print(f"wrote {done.path}: {done.layers} layers, {done.rows} activation blocks, {done.tokens} token rows "
          f"as {done.activations}{where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from interlatent.cli import UsageParser

    parser = UsageParser(prog="python -m interlatent.vis.transfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in (("export", "to Parquet shards (or --activations sqlite)"),
                            ("import", "to SQLite blobs (or --activations parquet)")):
        p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        add_debug(p)
        p.set_defaults(_parser=p)
    args = parser.parse_args(argv)
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
