"""Train an SAE or a transcoder on a stored layer, resumably and, under torchrun, data-parallel.

    python -m interlatent.vis.train latents.db --layer llm.layer.1 --k 8 --checkpoint-every 50 --resume
    torchrun --standalone --nproc_per_node=2 -m interlatent.vis.train latents.db --layer llm.layer.1 --k 8

Runs :class:`~interlatent.analysis.train.SAEPipeline` (or ``--kind transcoder``) and prints its
held-out metrics. ``--checkpoint-every N`` writes a checkpoint every N steps (beside the store's
artifacts, deleted once the artifact is recorded); ``--resume`` continues from the latest one, so
the same command run again after a crash carries on exactly where it stopped. Launched by torchrun
(``WORLD_SIZE`` > 1), the ranks join a gloo process group and split every batch between them, each
reading only its own partitions of the training prompts (``--data-partitions P``, a multiple of the
world size, default one per rank; ``1``: every rank reads the whole stream); rank 0 records the
artifact, backfills and prints. One process with the same ``--data-partitions`` trains on the same batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from interlatent.errors import DatabaseNotFoundError
from interlatent.vis._cli import add_db, add_format, emit_rows, main_for, positive_float, positive_int

METRICS = ["fvu", "explained_variance", "l0", "dead_fraction", "steps", "batch_size", "train_tokens"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("--layer", required=True, help="the stored layer to train on (e.g. llm.layer.1)")
    parser.add_argument("--kind", choices=("sae", "transcoder"), default="sae", help="what to train (default: sae)")
    parser.add_argument("--k", type=positive_int, default=32, help="active latents per token, TopK (default: 32)")
    parser.add_argument("--relu", action="store_true", help="train ReLU + L1 instead of TopK")
    parser.add_argument("--d-sae", type=positive_int, default=None, help="dictionary width (default: 8x the layer's)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (default: ~5 epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (default: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="split, init and shuffling seed (default: 0)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None, help="write a checkpoint every N steps")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: beside the artifacts)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, if there is one")
    parser.add_argument("--data-partitions", type=positive_int, default=None,
                        help="deal the training prompts into P partitions read apart (default: one per torchrun rank)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate (default: set by the width, 1e-2 up to 256 and "
                             "1e-2 * sqrt(256 / width) past it for TopK SAEs; 0.01 trains as before that default)")
    parser.add_argument("--decoder-lr-scale", type=positive_float, default=None,
                        help="the decoder's learning rate over the rest's (default: set by the shape and the run's "
                             "length, sqrt(7500 / fires) within 1..10 for TopK, fires = steps x the batch trained on "
                             "x k / d_sae; 1 for ReLU)")
    parser.add_argument("--lr-schedule", choices=("wsd", "linear", "constant"), default=None,
                        help="the learning-rate schedule (default: set by the run's length; TopK: wsd until every "
                             "latent is expected to fire on 7500 inputs, linear from there; ReLU: wsd)")
    parser.add_argument("--no-backfill", action="store_true", help="do not write the latents back into the store")
    add_format(parser)


def _process_group() -> bool:
    """Join torchrun's process group (gloo) when launched with more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def run(args: argparse.Namespace) -> int:
    from interlatent.analysis.train import SAEPipeline, TrainConfig, TranscoderPipeline
    from interlatent.db import LatentDB

    local = args.db.removeprefix("sqlite:///")
    if not Path(local).expanduser().is_file():
        raise DatabaseNotFoundError(f"no store at {args.db!r}: give the path of an existing store (e.g. latents.db)")
    grouped = _process_group()
    try:
        pipeline: Any = SAEPipeline if args.kind == "sae" else TranscoderPipeline
        with LatentDB(args.db) as db:
            res = pipeline(db, args.layer, k=args.k, activation="relu" if args.relu else "topk", d_sae=args.d_sae,
                           steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                           backfill=not args.no_backfill, checkpoint_every=args.checkpoint_every,
                           checkpoint_dir=args.checkpoint_dir, resume=args.resume, data_partitions=args.data_partitions,
                           train_config=(None if args.decoder_lr_scale is None and args.lr is None
                                         and args.lr_schedule is None
                                         else TrainConfig(lr=args.lr, decoder_lr_scale=args.decoder_lr_scale,
                                                          lr_schedule=args.lr_schedule)),
                           progress=False).run()
        if int(os.environ.get("RANK", "0")) == 0:
            row = {"artifact_id": res.artifact_id, "latent_layer": res.latent_layer or "",
                   **{k: res.metrics[k] for k in METRICS}}
            emit_rows([row], list(row), args.format)
    finally:
        if grouped:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.train")


if __name__ == "__main__":
    sys.exit(main())
