"""Attribution scores recorded in a store (``interlatent.patch.attribute(..., db=db)``): which latents
move the metric most, per record.

    interlatent attribute latents.db                                  # the latest record of each layer
    interlatent attribute latents.db --layer latent_sae:llm.layer.0 --top 10 --format json
    interlatent attribute latents.db --list                           # every record, one row each
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from typing import Any

from interlatent.errors import ConfigError, LayerNotFoundError
from interlatent.vis._cli import add_db, add_format, emit_rows, main_for, open_db, positive_int

COLUMNS = ["intervention_id", "layer", "method", "baseline", "rank", "latent", "score", "abs_score"]
LIST_COLUMNS = ["intervention_id", "layer", "method", "baseline", "steps", "n_prompts", "n_active", "metric_clean",
                "error_score", "created_at"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("--layer", help="only records of this latent layer (default: every layer)")
    parser.add_argument("--id", type=positive_int, dest="record", help="this record (an intervention id)")
    parser.add_argument("--top", type=positive_int, default=20, help="the N latents of largest |score| (default 20)")
    parser.add_argument("--all", action="store_true", help="every active latent, not only the top N")
    parser.add_argument("--list", action="store_true", help="one row per record instead of its latents")
    add_format(parser)


def _method(spec: dict[str, Any]) -> Any:
    """``atp``, ``ig`` (each latent's own path) or ``ig:joint``; records made before IG had a choice
    of path were on the joint one."""
    method = spec.get("method")
    return "ig:joint" if method == "ig" and spec.get("path", "joint") == "joint" else method


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _rows_of(record: dict[str, Any], top: int | None) -> list[dict[str, Any]]:
    res, spec = record["results"], record["spec"]
    scores = res.get("scores") or []
    active = res.get("active_latents")
    latents = list(range(len(scores))) if active is None else [int(i) for i in active]
    latents.sort(key=lambda i: (-abs(_number(scores[i])) if math.isfinite(_number(scores[i])) else math.inf, i))
    if top is not None:
        latents = latents[:top]
    return [{"intervention_id": int(record["intervention_id"]), "layer": record["layer"],
             "method": _method(spec), "baseline": spec.get("baseline"), "rank": rank, "latent": i,
             "score": _number(scores[i]), "abs_score": abs(_number(scores[i]))}
            for rank, i in enumerate(latents, start=1)]


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        df = db.interventions()
        known = set(db.layers()) | set(df["layer"])
    if args.layer is not None:
        if args.layer not in known:
            close = difflib.get_close_matches(args.layer, sorted(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LayerNotFoundError(f"no layer {args.layer!r} in {args.db}{hint}")
        df = df[df["layer"] == args.layer]
    df = df[df["kind"] == "attribution"]
    if args.record is not None:
        df = df[df["intervention_id"] == args.record]
        if df.empty:
            raise ConfigError(f"no attribution record with id {args.record} in {args.db}; list them with "
                              "interlatent attribute STORE --list")
    records = df.to_dict(orient="records")
    if args.list:
        rows = [{"intervention_id": int(r["intervention_id"]), "layer": r["layer"], "method": _method(r["spec"]),
                 "baseline": r["spec"].get("baseline"), "steps": r["spec"].get("steps"),
                 "n_prompts": r["spec"].get("n_prompts"), "n_active": r["results"].get("n_active"),
                 "metric_clean": _number(r["results"].get("metric_clean")),
                 "error_score": _number(r["results"].get("error_score")), "created_at": r["created_at"]}
                for r in records]
        emit_rows(rows, LIST_COLUMNS, args.format, empty="no attribution records in this store")
        return 0
    if args.record is None:  # the latest record of each layer
        latest: dict[str, dict[str, Any]] = {}
        for r in records:
            latest[r["layer"]] = r
        records = list(latest.values())
    rows = [row for r in records for row in _rows_of(r, None if args.all else args.top)]
    emit_rows(rows, COLUMNS, args.format, empty="no attribution records in this store (record some with "
                                                "interlatent.patch.attribute(..., db=db))")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.attribute")


if __name__ == "__main__":
    sys.exit(main())
