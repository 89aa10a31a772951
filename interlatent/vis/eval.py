"""Evaluate a store's dictionaries on their model: SAEBench's core metrics (as sae_lens.evals).

    interlatent eval latents.db --list
    interlatent eval latents.db --layer latent_sae:llm.layer.1
    interlatent eval latents.db --layer latent_sae:llm.layer.1 --model demo-quick --tokens tokens.npy
    interlatent eval latents.db --layer A1,A2,A3 --layer B1,B2,B3 --format json

Per dictionary: CE-loss and KL scores with the reconstruction spliced in (against zero- and
mean-ablation), explained variance around the evaluated set's mean, MSE, L0, l2 norm ratio,
relative reconstruction bias, feature density (histogram in JSON) and dead fraction. Tokens are
the stored prompts (their token ids) unless --tokens names a file (.npy, .pt, .safetensors, or
text: ids per line). The model is the one the store recorded when it can be rebuilt offline (the
embedded demo model, a local checkpoint), else --model demo|demo-quick|PATH. A comma-separated
--layer is a group of dictionaries (seeds): the output adds each group's mean and sd, and between
groups, whether they differ by less than two sds. --list shows what can be evaluated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from interlatent.vis._cli import (
    add_db,
    add_format,
    dumps_strict,
    emit,
    emit_many,
    json_row,
    main_for,
    open_db,
    positive_int,
)

DEMO_PREFIX = "interlatent-demo-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--layer", action="append", metavar="LAYERS",
                      help="a backfilled latent layer to evaluate (repeatable; comma-separated: seeds of one group)")
    what.add_argument("--list", action="store_true", help="list the latent layers that can be evaluated")
    parser.add_argument("--model", help="demo, demo-quick, or a local Hugging Face checkpoint directory (default: "
                        "the model the store recorded, when it can be rebuilt offline)")
    parser.add_argument("--tokens", metavar="FILE", help="token ids to evaluate on instead of the stored prompts")
    parser.add_argument("--max-prompts", type=positive_int, default=256,
                        help="stored prompts to evaluate on (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--include-special-tokens", action="store_true",
                        help="count BOS/EOS/pad positions too (SAELens's exclude_special_tokens=False)")
    add_format(parser)


def recorded_model(db: Any, latent_layer: str) -> str | None:
    """The model name the store recorded for the layer a latent layer was computed from."""
    model = db.recorded_model(latent_layer)
    if model:
        return model
    runs = db.runs()
    models = [m for m in runs.loc[runs["kind"] == "llm", "model"].dropna()] if "kind" in runs else []
    return str(models[-1]) if models else None


def _rebuild_hint(model: str | None) -> str:
    if model is None:
        return "pass --model"
    if model.startswith(DEMO_PREFIX):
        return "demo model"
    return "local checkpoint" if Path(model).expanduser().is_dir() else "pass --model"


def list_rows(db: Any) -> list[dict[str, Any]]:
    arts = db.artifacts().set_index("artifact_id")
    rows = []
    for name in db.layers():
        info = db.layer_info(name)
        if not name.startswith(("latent_sae:", "latent:")):
            continue
        model = recorded_model(db, name)
        art = arts.loc[info.artifact_id] if info.artifact_id in arts.index else None
        rows.append({"layer": name, "width": info.width, "source": info.source, "artifact_id": info.artifact_id,
                     "architecture": None if art is None else art["architecture"], "model": model,
                     "rebuild": _rebuild_hint(model) if art is not None else "no artifact: not evaluable"})
    return rows


def load_eval_model(spec: str | None, recorded: str | None) -> Any:
    """``demo`` / ``demo-quick`` / a checkpoint path; without one, the recorded model if it can be
    rebuilt offline. Raises :class:`ConfigError` saying what to pass otherwise."""
    from interlatent.errors import ConfigError
    from interlatent.llm import demo_model
    from interlatent.llm.demo_model import QUICK, DemoModelConfig
    from interlatent.llm.loading import load_model

    if spec in ("demo", "demo-quick"):
        return demo_model(quick=spec == "demo-quick")
    if spec:
        return load_model(spec)
    if recorded is not None:
        if recorded == f"{DEMO_PREFIX}{QUICK.key()}":
            return demo_model(quick=True)
        if recorded == f"{DEMO_PREFIX}{DemoModelConfig().key()}":
            return demo_model()
        if Path(recorded).expanduser().is_dir():
            return load_model(recorded)
    raise ConfigError(f"the store records the model {recorded!r}, which cannot be rebuilt offline; pass "
                      "--model demo, --model demo-quick or --model PATH (a local Hugging Face checkpoint)")


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        if args.list:
            rows = list_rows(db)
            import pandas as pd

            emit(pd.DataFrame(rows, columns=["layer", "width", "source", "artifact_id", "architecture", "model",
                                             "rebuild"]), args.format, empty="no latent layers in the store")
            return 0
        return _evaluate(db, args)


def _evaluate(db: Any, args: argparse.Namespace) -> int:
    import pandas as pd

    from interlatent.analysis.evaluate import METRICS, evaluate, load_token_file, seed_summary, tokens_from_db
    from interlatent.backends import make_backend
    from interlatent.patch import LatentPatch

    groups = {spec: [n.strip() for n in spec.split(",") if n.strip()] for spec in args.layer}
    patches = {name: LatentPatch.from_db(db, name) for names in groups.values() for name in names}
    models: dict[Any, Any] = {}
    results: dict[str, list[Any]] = {}
    file_tokens = load_token_file(args.tokens) if args.tokens else None
    for group, names in groups.items():
        for name in names:
            recorded = None if args.model else recorded_model(db, name)
            key = args.model or recorded
            if key not in models:
                models[key] = load_eval_model(args.model, recorded)
            model = models[key]
            if file_tokens is not None:
                tokens, mask = file_tokens
            else:
                tokens, mask = tokens_from_db(db, max_prompts=args.max_prompts,
                                              max_len=make_backend(model).n_ctx)
            res = evaluate(patches[name], model, tokens, attention_mask=mask, batch_size=args.batch_size,
                           exclude_special_tokens=not args.include_special_tokens, name=name)
            results.setdefault(group, []).append(res)
    rows = [{"group": g, **r.row()} for g, rs in results.items() for r in rs]
    summary, comparisons = seed_summary(results) if len(rows) > 1 else ([], [])
    if args.format == "json":
        dicts = [{**json_row({"group": g, **r.row()}),
                  "density_histogram": {"log10_edges": [float(e) for e in _edges()],
                                        "counts": [int(c) for c in r.density_histogram]}}
                 for g, rs in results.items() for r in rs]
        print(dumps_strict({"dictionaries": dicts, "summary": [json_row(r) for r in summary],
                            "comparisons": [json_row(r) for r in comparisons]}))
        return 0
    frames = {"dictionaries": pd.DataFrame(rows, columns=["group", "dictionary", *METRICS, "n_tokens", "n_prompts"])}
    if args.format == "table":
        wide = frames["dictionaries"].set_index("dictionary").drop(columns=["group"]).T
        frames = {"metrics": wide.reset_index(names="metric")}
    if any(len(rs) > 1 for rs in results.values()):
        frames["summary"] = pd.DataFrame(summary, columns=["group", "metric", "mean", "sd", "n"])
    if len(results) > 1:
        frames["comparisons"] = pd.DataFrame(comparisons, columns=["metric", "group_a", "group_b", "difference", "sd",
                                                                   "within_2sd"])
    emit_many(frames, args.format)
    return 0


def _edges() -> list[float]:
    from interlatent.analysis.evaluate import DENSITY_BINS

    return DENSITY_BINS.tolist()


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.eval")


if __name__ == "__main__":
    sys.exit(main())
