"""Labelled prompt sets: pairs and CSV -> collection -> probe / transcoder / SAE -> label-filtered searches.

    python demos/prompt_dataset_demo.py [--quick] [--out demo_out/prompts]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.llm import PromptDataset, PromptExample, demo_model
from interlatent.llm import demo_corpus as dc
from interlatent.vis import queries


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out/prompts")
    ap.add_argument("--quick", action="store_true", help="the small demo model, fewer steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = demo_model(quick=args.quick)

    # 1. from pairs: the same situations in two voices
    rng = random.Random(1)
    teen, romantic = dc.CHARACTERS[0], dc.CHARACTERS[1]
    texts, labels = [], []
    for d in dc.DILEMMAS[:20]:
        for ch in (teen, romantic):
            texts.append(dc.render(ch, d, rng))
            labels.append(ch.name)
    pairs = PromptDataset.from_pairs(texts, labels)
    # 2. from CSV: severity as a numeric label, with metadata columns
    csv_path = PromptDataset([PromptExample(dc.render(dc.CHARACTERS[3], d, rng), label=d.severity, dilemma=d.id)
                              for d in dc.DILEMMAS[:24]]).to_csv(out / "severity.csv")
    severity = PromptDataset.from_csv(csv_path, text_col="text", label_col="label")
    print(f"pairs: {len(pairs)} prompts {pairs.label_classes}; CSV: {len(severity)} prompts from {csv_path}")

    results = {}
    for name, ds, task in (("voices", pairs, "classification"), ("severity", severity, "regression")):
        db_path = out / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        db = LatentDB(db_path)
        LLMCollector(db, layer_indices=[-1], hooks=["resid_post", "mlp_in", "mlp_out"],
                     prompt_context_fn=ds.prompt_context_fn(), token_metrics_fn=ds.token_metrics_fn("label"),
                     batch_size=16).run(model, prompts=ds.texts)
        probe = train_linear_probe(db, layer="llm.layer.1", target_key="label", task=task, pool="mean", epochs=200,
                                   lr=0.02)
        key = "accuracy" if task == "classification" else "r2"
        base = probe.metrics.get("baseline_accuracy", probe.metrics.get("baseline_r2"))
        print(f"[{name}] probe {key} {probe.metrics[key]:.2f} (baseline {base:.2f}, {probe.metrics['n_test']} held-out prompts)")
        steps = 200 if args.quick else 500
        sae = SAEPipeline(db, "llm.layer.1", k=8, steps=steps, progress=False).run()
        tc = TranscoderPipeline(db, "llm.layer.1", k=8, steps=steps, progress=False).run()
        print(f"[{name}] SAE FVU {sae.metrics['fvu']:.3f}, transcoder FVU {tc.metrics['fvu']:.3f}")
        results[name] = {"probe": {key: probe.metrics[key], "baseline": base}, "sae_fvu": sae.metrics["fvu"],
                         "transcoder_fvu": tc.metrics["fvu"]}
        if name == "voices":
            for label in ("teen", "romantic"):
                hits = queries.search(db, layer="latent_sae:llm.layer.1", label=label, top=3)
                print(f"[{name}] top SAE activations in {label} prompts:")
                for row in hits.itertuples():
                    print(f"    latent {row.channel:4d} {row.value:6.2f}  {row.context}")
                results[name][f"top_{label}"] = queries.to_records(hits)
        db.close()
    (out / "prompt_dataset_results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"outputs in {out}/")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
