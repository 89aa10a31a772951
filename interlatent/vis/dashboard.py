"""A self-contained offline HTML dashboard of a store.

    interlatent dashboard latents.db -o report.html
    python -m interlatent.vis.dashboard latents.db -o report.html

One HTML file built from the store alone — no model, no network, no CDN: its Content-Security-Policy
forbids every network load. Its page, style and script are package files
(``interlatent/vis/assets/``), inlined; its data is a JSON object of typed records
(:mod:`interlatent.vis.dashboard_data`, assembled in :mod:`interlatent.vis.dashboard_views`).

- A layer header: a dictionary's held-out FVU, explained variance, L0, dead fraction and, where
  evaluated, the CE-loss score; channel statistics for a model layer.
- An index of latents (active count, max, density, strongest label correlation, explanation),
  sortable (dead latents last either way) and filterable.
- A latent page: top examples and examples across activation quantiles with ±24 tokens of context
  cut at word boundaries, every token shaded by its activation (hover: its value); the logit
  effects stored by :func:`interlatent.analysis.logit_effects.compute_logit_effects`; a histogram
  with axes and counts (signed for dense channels); the tokens with the highest mean activation;
  label correlations and the mean per label; stored patch, steering and attribution results as
  tables of named fields with an effect-vs-control chart.
- A prompt view: every prompt (up to ``prompt_view_tokens``), paged and searchable, its tokens
  shaded by a latent; clicking a token lists its top latents.
- Compare: two dictionaries decoding into one layer matched by decoder cosine, and the A/B label diff.

Deep links: ``report.html#layer=NAME&latent=N``, ``#view=prompts&layer=NAME&prompt=P``. Every text
goes into the page through ``textContent``: a token ``<script>`` shows as text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import is_dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from interlatent import __version__
from interlatent.db import LatentDB
from interlatent.errors import OutputError
from interlatent.vis._cli import add_db, main_for, open_db, output_file, positive_int
from interlatent.vis.dashboard_data import Meta, Payload, plain
from interlatent.vis.dashboard_views import build_layer, compare_records, intervention_records

ASSETS = ("dashboard.html", "dashboard.css", "dashboard.js")


def asset(name: str) -> str:
    """The text of one of the dashboard's package files (``interlatent/vis/assets/NAME``)."""
    return resources.files("interlatent.vis").joinpath("assets", name).read_text(encoding="utf-8")


def _json_for_script(data: Any) -> str:
    """Strict JSON safe inside a <script> element (no ``</script>``, no HTML-significant characters).
    A non-finite number is written as ``{"$nonfinite": "inf" | "-inf" | "nan"}``, which the page's
    reader turns back into ``Infinity`` / ``-Infinity`` / ``NaN``. Records (dataclasses) are written
    as objects of their fields."""
    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=plain)

    try:
        text = dumps(data)
    except ValueError:  # a non-finite number somewhere: tag them all (one more pass, only then)
        text = dumps(_tag_nonfinite(data))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _tag_nonfinite(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = plain(obj)
    if isinstance(obj, dict):
        return {k: _tag_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag_nonfinite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return {"$nonfinite": "nan" if np.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    return obj


def build_dashboard(db: LatentDB, out: str | Path, *, layers: list[str] | None = None, max_tokens: int = 200_000,
                    top_examples: int = 10, max_latents: int | None = None, prompt_view_tokens: int = 50_000,
                    prompt_view_per_token: int = 8, prompt_view_prompts: int | None = None,
                    title: str | None = None) -> Path:
    """Write the dashboard of ``db`` to ``out`` (an existing directory: ``report.html`` inside it)
    and return the path written.

    Args:
        layers: layers to include (default: every latent layer, or every layer when there is none).
        max_tokens: tokens per layer scanned for densities, quantiles, histograms and token means.
        top_examples: top activating examples per latent.
        max_latents: only the first N channels of each layer (default: all).
        prompt_view_tokens: the prompt view holds every scanned prompt up to this many tokens.
        prompt_view_per_token: latents listed per token in the prompt view.
        prompt_view_prompts: at most this many prompts in the prompt view (default: no cap).
    """
    names = layers or [n for n in db.layers() if db.layer_info(n).kind in ("latent", "latent_sae")] or db.layers()
    payload = Payload(Meta(str(db.path), datetime.now(timezone.utc).isoformat(timespec="seconds"), __version__,
                           title or f"Interlatent — {db.path.name}"))
    stored = db.interventions()
    raw = [{"id": int(r.intervention_id), "layer": r.layer, "kind": r.kind,
            "results": r.results if isinstance(r.results, dict) else {}} for r in stored.itertuples()]
    token_text: dict[int, str] = {}
    for name in names:
        seen = build_layer(db, name, payload, max_tokens=max_tokens, top_examples=top_examples,
                           max_latents=max_latents, per_token=prompt_view_per_token, view_tokens=prompt_view_tokens,
                           view_prompts=prompt_view_prompts, interventions=raw)
        for k, v in seen.items():
            token_text.setdefault(k, v)
    payload.interventions = intervention_records(db, token_text)
    payload.compare = compare_records(db, names)
    html = render_html(payload)
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the dashboard to {str(out)!r}: {exc.strerror or exc}; choose another "
                          "output path (-o)") from exc
    return out


def render_html(payload: Payload) -> str:
    """The page: the package's HTML with its style, script and the payload inlined (one pass, so
    nothing inlined is read as a marker)."""
    script = asset("dashboard.js")
    if "</script" in script.lower():
        raise OutputError("interlatent/vis/assets/dashboard.js contains '</script', which would end the inline "
                          "script early; reinstall interlatent")
    parts = {"TITLE": _escape(payload.meta.title), "CSS": asset("dashboard.css"), "JS": script,
             "DATA": _json_for_script(payload)}
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: parts[m.group(1)], asset("dashboard.html"))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("-o", "--out", type=output_file, default="report.html", help="HTML file to write (default "
                        "report.html; a directory: report.html inside it); its folder must exist")
    parser.add_argument("--layer", action="append", help="a layer to include (repeatable; default: latent layers)")
    parser.add_argument("--max-latents", type=positive_int, help="only the first N latents of each layer")
    parser.add_argument("--max-tokens", type=positive_int, default=200_000, help="tokens scanned per layer (default 200,000)")
    parser.add_argument("--prompt-view-tokens", type=positive_int, default=50_000, help="tokens of prompts held in the "
                        "prompt view (default 50,000: every prompt of a smaller store)")


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        layers = [db.resolve_layer(n) for n in args.layer] if args.layer else None
        path = build_dashboard(db, args.out, layers=layers, max_latents=args.max_latents, max_tokens=args.max_tokens,
                               prompt_view_tokens=args.prompt_view_tokens)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.dashboard")


if __name__ == "__main__":
    sys.exit(main())
