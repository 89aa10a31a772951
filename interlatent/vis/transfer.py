"""Convert a store between activation tiers (losslessly: every table, every block bit-exact), or
to and from SAELens activation caches.

    interlatent export latents.db big.db                          # SQLite blobs -> Parquet shards
    interlatent export latents.db big.db --shard-root /data/big.shards --force
    interlatent import big.db small.db                            # Parquet shards -> SQLite blobs
    python -m interlatent.vis.transfer export latents.db big.db --activations parquet
    interlatent export latents.db cache_dir --saelens-cache --layers llm.layer.1
    interlatent import cache_dir latents.db                       # a SAELens cache into a store

Between tiers both create DEST (refused if it exists, unless --force replaces it) and never change
SRC. ``export`` writes Parquet shards by default, ``import`` SQLite blobs; ``--activations`` picks
either. The shards go to ``DEST.shards`` beside DEST unless ``--shard-root`` names a folder or an
fsspec URL.

``export --saelens-cache`` writes stored dense layers (``--layers``, default every model layer) as
the directory SAELens's ``CacheActivationsRunner`` writes (``--context-size`` keeps only prompts of
that many positions, ``--truncate`` also cuts longer ones). ``import`` of a directory that is such
a cache adds it to DEST as one run, creating DEST (in the ``--activations`` tier, default sqlite)
when it does not exist; ``--layers`` picks hooks of the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
    activations: str | None
    shard_root: str | None
    force: bool
    layers: tuple[str, ...] | None = None
    context_size: int | None = None
    truncate: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the store to read (path.db); it must exist and is not changed")
    parser.add_argument("dst", metavar="DEST", help="the store to create (path.db)")
    parser.add_argument("--activations", choices=TIERS, default=None,
                        help="where DEST keeps its activations: parquet shards or sqlite blobs (default: parquet "
                             "for export, sqlite for import)")
    parser.add_argument("--shard-root", default=None,
                        help="DEST's shard folder or fsspec URL (default: DEST.shards beside DEST)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    cache = parser.add_argument_group("SAELens activation caches")
    cache.add_argument("--saelens-cache", action="store_true",
                       help="export: write DEST as a SAELens activation cache directory; import: SRC is one "
                            "(found by itself when SRC is a directory)")
    cache.add_argument("--layers", nargs="+", help="the layers to export, or the cache's hooks to import "
                       "(default: every dense model layer / every hook)")
    cache.add_argument("--context-size", type=int, default=None,
                       help="export only prompts of this many positions (default: all, which must be one length)")
    cache.add_argument("--truncate", action="store_true", help="with --context-size: cut longer prompts to it")


def plan(args: argparse.Namespace) -> TransferPlan:
    """The transfer the parsed arguments ask for; a contradiction is a usage error (exit 2)."""
    command = getattr(args, "command", None) or "export"
    parser = getattr(args, "_parser", None)

    def usage(message: str) -> None:
        if parser is not None:
            parser.error(message)
        raise SystemExit(2)

    cache = bool(getattr(args, "saelens_cache", False))
    if command == "import" and not cache and Path(args.src).is_dir():
        cache = True  # a store is a file; a directory can only be an activation cache
    layers = tuple(args.layers) if getattr(args, "layers", None) else None
    context_size = getattr(args, "context_size", None)
    truncate = bool(getattr(args, "truncate", False))
    if not cache and (layers or context_size is not None or truncate):
        usage("--layers, --context-size and --truncate are for SAELens activation caches (--saelens-cache)")
    if context_size is not None and context_size < 1:
        usage(f"--context-size must be a positive number of positions, got {context_size}")
    if truncate and context_size is None:
        usage("--truncate needs --context-size: the length to cut prompts to")
    if cache and command == "import" and (context_size is not None or truncate):
        usage("--context-size and --truncate are for export; an imported cache keeps its own context size")
    if cache and command == "export" and (args.activations or args.shard_root):
        usage("--activations and --shard-root are for stores; a SAELens cache is a datasets directory")
    # a cache imports into DEST as it is (its own tier) or, when DEST is new, into --activations (sqlite)
    activations = args.activations or (None if cache else DEFAULT_TIER[command])
    if activations in ("sqlite", None) and args.shard_root is not None and not (cache and command == "import"):
        usage("--shard-root is for --activations parquet; sqlite blobs need no shard folder")
    kind = f"saelens-{command}" if cache else "tier"
    return TransferPlan(kind, args.src, args.dst, activations, args.shard_root, bool(args.force), layers,
                        context_size, truncate)


def convert(job: TransferPlan) -> Any:
    """Carry out a plan; returns what the conversion reports."""
    if job.kind == "saelens-export":
        from interlatent.analysis.interop import export_saelens_cache
        from interlatent.vis._cli import open_db

        with open_db(job.src) as db:
            return export_saelens_cache(db, job.dst, layers=job.layers, context_size=job.context_size,
                                        truncate=job.truncate, overwrite=job.force)
    if job.kind == "saelens-import":
        from interlatent.analysis.interop import import_saelens_cache
        from interlatent.analysis.interop.cache_format import read_saelens_cache
        from interlatent.db import LatentDB

        read_saelens_cache(job.src)  # a directory that is not a cache fails before DEST is created
        with LatentDB(job.dst, activations=job.activations, shard_root=job.shard_root) as db:
            return import_saelens_cache(job.src, db, layers=list(job.layers) if job.layers else None)
    from interlatent.db.transfer import convert_store

    return convert_store(job.src, job.dst, activations=job.activations, shard_root=job.shard_root, force=job.force)


def run(args: argparse.Namespace) -> int:
    job = plan(args)
    done = convert(job)
    if job.kind == "saelens-export":
        hooks = ", ".join(c.hook_name for c in done.columns)
        print(f"wrote {done.path}: a SAELens activation cache of {done.n_sequences} sequences x "
              f"{done.context_size} positions ({hooks})")
    elif job.kind == "saelens-import":
        layers = ", ".join(f"{h} -> {n}" for h, n in done.layers.items())
        print(f"added {len(done.prompt_indices)} sequences ({done.n_tokens} tokens) to {job.dst} as run "
              f"{done.run_id}: {layers}")
    else:
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
