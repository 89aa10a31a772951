"""Build the character-ablation dataset: honesty dilemmas, each told in four voices.

The bundled set has 48 dilemmas written for the project (``interlatent.llm.demo_corpus``); a local
CSV or JSONL with a ``situation`` column (and optionally ``severity`` 1-4, ``id``) replaces it.
Each dilemma is rewritten in the voice of a hyper-online ironic 17-year-old, an intense romantic
22-year-old, a managerial rationalizing 46-year-old and a reflective philosophical 71-year-old by
seeded style templates. ``--rewriter module:function`` plugs in another rewriter
(``fn(character, dilemma, rng) -> text``), e.g. one that calls a local LLM.

    python demos/character_ablations/build_dataset.py --out demo_out/characters/dilemmas.csv
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import random
import sys
from pathlib import Path

from interlatent.llm import demo_corpus as dc


def load_dilemmas(path: str | None) -> list[dc.Dilemma]:
    if path is None:
        return list(dc.DILEMMAS)
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"no dilemma file at {p}")
    rows = ([json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".jsonl"
            else list(csv.DictReader(p.open(newline="", encoding="utf-8"))))
    if not rows or "situation" not in rows[0]:
        raise SystemExit(f"{p} needs a 'situation' column (got {list(rows[0]) if rows else 'no rows'})")
    return [dc.Dilemma(int(r.get("id", i)), str(r["situation"]), int(r.get("severity") or 2)) for i, r in enumerate(rows)]


def build(dilemmas: list[dc.Dilemma], seed: int, rewriter=None) -> list[dict]:
    rng = random.Random(seed)
    render = rewriter or dc.render
    rows = []
    for d in dilemmas:
        for ch in dc.CHARACTERS:
            rows.append({"text": render(ch, d, rng), "label": ch.name, "character": ch.name, "age": ch.age,
                         "dilemma_id": d.id, "severity": d.severity, "decision": dc.decision(ch, d).strip()})
    return rows


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out/characters/dilemmas.csv")
    ap.add_argument("--input", help="a local CSV/JSONL of dilemmas (column 'situation', optional 'severity', 'id')")
    ap.add_argument("--n-dilemmas", type=int, help="use only the first N dilemmas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rewriter", help="module:function rewriting (character, dilemma, rng) -> text")
    args = ap.parse_args(argv)
    rewriter = None
    if args.rewriter:
        mod, fn = args.rewriter.split(":")
        rewriter = getattr(importlib.import_module(mod), fn)
    dilemmas = load_dilemmas(args.input)[: args.n_dilemmas]
    rows = build(dilemmas, args.seed, rewriter)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} prompts ({len(dilemmas)} dilemmas x {len(dc.CHARACTERS)} voices) -> {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
