"""The whole flow on the embedded demo model, offline, end to end.

labelled prompts -> collection (residual stream + MLP in/out) -> stats -> probe -> transcoder -> SAE
-> searches and a plot -> attribution of the decision to the SAE latents at the decision position -> an
ablation of the top ones with its random-latent control -> summary (and the dashboard).

    python demos/llm_workflow_demo.py            # the embedded model (trained once, then cached)
    python demos/llm_workflow_demo.py --quick    # the small variant, for a fast look
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.logit_effects import compute_logit_effects
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.llm import PromptDataset, PromptExample, demo_model
from interlatent.llm import demo_corpus as dc
from interlatent.patch import LatentPatch, ablation_effect, attribute, splice_quality
from interlatent.vis import queries
from interlatent.vis.plot import figure


def build_prompts(n_dilemmas: int, seed: int = 0) -> PromptDataset:
    """Every character telling each of the first ``n_dilemmas`` dilemmas, labelled by speaker."""
    rng = random.Random(seed)
    return PromptDataset(
        PromptExample(dc.render(ch, d, rng), label=ch.name, dilemma=d.id, severity=d.severity,
                      decision=dc.decision(ch, d).strip())
        for d in dc.DILEMMAS[:n_dilemmas] for ch in dc.CHARACTERS
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    ap.add_argument("--quick", action="store_true", help="the small demo model and fewer prompts")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db_path = out / "workflow.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    model = demo_model(quick=args.quick)
    last = model.cfg.n_layers - 1
    layer = f"llm.layer.{last}"
    ds = build_prompts(12 if args.quick else 48)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}); "
          f"{len(ds)} prompts, 4 speakers")

    db = LatentDB(db_path)
    LLMCollector(db, layer_indices=[-1], hooks=["resid_post", "mlp_in", "mlp_out"],
                 prompt_context_fn=ds.prompt_context_fn(), token_metrics_fn=ds.token_metrics_fn("label"),
                 metrics=["next_token_loss"], batch_size=16).run(model, prompts=ds.texts)
    db.compute_stats(min_count=5)
    print(f"collected {db.n_tokens(layer)} tokens x {len(db.layers())} hook points into {db_path}")

    probe = train_linear_probe(db, layer=layer, target_key="label", pool="mean", split_key="dilemma", epochs=200,
                               lr=0.02)
    pm = probe.metrics
    print(f"speaker probe (mean-pooled {layer}, unseen dilemmas): accuracy {pm['accuracy']:.2f} "
          f"vs majority baseline {pm['baseline_accuracy']:.2f} on {pm['test_prompts']} prompts")

    steps = 300 if args.quick else 600
    tc = TranscoderPipeline(db, layer, k=8, steps=steps, progress=False).run()
    sae = SAEPipeline(db, layer, k=8, steps=steps, progress=False).run()
    for name, res in (("transcoder", tc), ("SAE", sae)):
        m = res.metrics
        print(f"{name:10s} held-out FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}  -> "
              f"{res.latent_layer}")

    db.compute_stats(min_count=5, layers=[tc.latent_layer, sae.latent_layer])
    for res in (tc, sae):  # the tokens each latent's decoder direction promotes / suppresses, for the dashboard
        compute_logit_effects(db, res.latent_layer, model)
    hits = queries.search(db, layer_prefix="latent_sae:", token_like=" heart", top=5)
    print("top SAE latents on tokens like ' heart':")
    for row in hits.itertuples():
        print(f"  latent {row.channel:4d}  {row.value:6.2f}  prompt {row.prompt_index:3d}  {row.context}")

    latent_layer = sae.latent_layer
    patch = LatentPatch.from_db(db, latent_layer)
    tell = model.tokenizer.encode(dc.ANSWERS[0], add_special_tokens=False)[0]
    hide = model.tokenizer.encode(dc.ANSWERS[1], add_special_tokens=False)[0]
    philosopher = [ex.text for ex in ds if ex.label == "philosopher"]
    lengths = {}
    for text in philosopher:
        lengths.setdefault(len(model.to_tokens(text)[0]), []).append(text)
    group = max(lengths.values(), key=len)  # prompts of one length batch without padding
    tokens = model.to_tokens(group)
    # the decision is read at the last position, and after the last block nothing mixes positions: rank
    # the latents active there by their attribution to the decision (tell - hide), toward hiding (the
    # philosopher always tells), and ablate the top ones there
    attr = attribute(patch, model, tokens, answer=(tell, hide), positions=[-1], method="atp", db=db)
    top_latents = [c for c in attr.top(5, sign="negative") if float(attr.scores[c]) < 0]
    print(f"attribution at the decision position: {int(attr.active.sum())} latents active there; top toward "
          f"'hide': {top_latents} (AtP {', '.join(f'{float(attr.scores[c]):+.3f}' for c in top_latents)})")
    trace_df = queries.trace(db, latent_layer, 0, top_latents[:3])
    png = out / "top_latents_prompt0.png"
    figure(trace_df, latent_layer, 0).savefig(png, dpi=110)
    effect = ablation_effect(patch, model, tokens, top_latents, answer=(tell, hide), positions=[-1], n_control=5,
                             seed=0, db=db)
    quality = splice_quality(patch, model, tokens, db=db)
    verdict = "exceeds" if effect.exceeds_control else "does not exceed"
    print(f"ablating the {len(top_latents)} latents of largest attribution at the decision position: "
          f"logit diff (tell - hide) changes by "
          f"{effect.value:+.3f}; random latents of similar frequency: {effect.control_mean:+.3f} ± "
          f"{effect.control_std:.3f} -> the effect {verdict} the control")
    print(f"splice quality: CE clean {quality['ce_clean']:.3f}, spliced {quality['ce_spliced']:.3f}, zero-ablated "
          f"{quality['ce_zero_ablated']:.3f}; loss recovered {quality['loss_recovered_zero']:.2f} (zero) / "
          f"{quality['loss_recovered_mean']:.2f} (mean)")

    report = None
    try:
        from interlatent.vis.dashboard import build_dashboard
    except ImportError:
        build_dashboard = None
    if build_dashboard is not None:
        report = build_dashboard(db, out / "report.html")
        print(f"dashboard: {report}")
    results = {"probe": {k: pm[k] for k in ("accuracy", "baseline_accuracy", "test_prompts")},
               "transcoder": tc.metrics, "sae": sae.metrics, "attribution": {"top_latents": top_latents,
               "scores": [float(attr.scores[c]) for c in top_latents], "n_active": int(attr.active.sum())},
               "ablation": effect.to_dict(), "splice": quality,
               "plot": str(png), "db": str(db_path), "report": None if report is None else str(report),
               "seconds": time.perf_counter() - start}
    (out / "workflow_results.json").write_text(json.dumps(results, indent=2, default=str))
    db.close()
    print(f"outputs in {out}/ (store, artifacts, plot, results JSON) — {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
