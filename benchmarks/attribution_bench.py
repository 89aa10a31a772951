"""Latent attribution (AtP, IG) against the exact single-latent sweep, on the embedded demo model.

The character dilemmas (48 dilemmas x 4 voices) are collected at block 0's residual stream and a
TopK SAE (1,024 latents, k 8) is trained on them. Each of 32 held-out prompts is one ablation case:
the metric is that prompt's decision logit difference (`` tell`` - `` hide``) at its last token; every
latent active on the prompt is zero-ablated at every position, one at a time (the exact sweep), and
scored by AtP, by IG on each latent's own path (the default, ``path="latent"``: 8 gradient
evaluations, each at the path midpoints of one group of latents) and by IG on the joint path (``path="joint"``: all latents
together, 8 midpoints). Reported: Spearman and Pearson of each estimate
against the exact effects (pooled over every (case, latent), and the median per case), top-20
recall per case, and the time of scoring every latent over the time of the exact sweep.

    .venv/bin/python benchmarks/attribution_bench.py [--cases 32] [--steps 8] [--out demo_out/attribution_bench.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.train import SAEPipeline, TrainConfig
from interlatent.llm import PromptDataset, PromptExample, demo_model
from interlatent.llm import demo_corpus as dc
from interlatent.patch import LatentPatch, attribute
from interlatent.patch.agreement import _correlations, exact_latent_effects, top_k_recall


def build_sae(model, workdir: Path, steps: int, seed: int = 0):
    rng = random.Random(0)
    ds = PromptDataset(PromptExample(dc.render(ch, d, rng), label=ch.name, dilemma=d.id)
                       for d in dc.DILEMMAS for ch in dc.CHARACTERS)
    db = LatentDB(workdir / "bench.db")
    LLMCollector(db, layer_indices=[0], hooks=["resid_post"], prompt_context_fn=ds.prompt_context_fn(),
                 batch_size=16).run(model, prompts=ds.texts)
    # the recipe of the figures in demos/character_ablations/README.md: the decoder at the base learning rate, on wsd
    sae = SAEPipeline(db, "llm.layer.0", k=8, steps=steps, progress=False, seed=seed,
                      train_config=TrainConfig(decoder_lr_scale=1.0, lr_schedule="wsd")).run()
    db.compute_stats(min_count=3, layers=[sae.latent_layer])
    return db, LatentPatch.from_db(db, sae.latent_layer), ds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="IG path steps")
    ap.add_argument("--k", type=int, default=20, help="top-k recall")
    ap.add_argument("--sae-steps", type=int, default=800)
    ap.add_argument("--quick", action="store_true", help="the quick demo model (for a smoke run)")
    ap.add_argument("--baseline", choices=("zero", "corrupt"), default="zero",
                    help="zero-ablation cases, or clean/corrupt pairs: a prompt of the same token length from "
                         "another voice or dilemma, with the other decision where one exists")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = demo_model(quick=args.quick)
    tell, hide = (model.tokenizer.encode(a, add_special_tokens=False)[0] for a in dc.ANSWERS)
    with tempfile.TemporaryDirectory() as tmp:
        db, patch, ds = build_sae(model, Path(tmp), args.sae_steps)
        texts = ds.texts[-args.cases:]  # the last dilemmas, each in every voice
        decision = {ex.text: dc.decision(next(c for c in dc.CHARACTERS if c.name == ex.label),
                                         next(d for d in dc.DILEMMAS if d.id == ex.meta["dilemma"]))
                    for ex in ds}
        by_len: dict[int, list[str]] = {}
        for t in ds.texts:
            by_len.setdefault(model.to_tokens(t).shape[1], []).append(t)
        if args.baseline == "corrupt":
            texts = [t for t in ds.texts if len(by_len[model.to_tokens(t).shape[1]]) > 1][-args.cases:]
        per_case = []
        pooled = {"exact": [], "atp": [], "ig": [], "ig_joint": []}
        t_exact = t_atp = t_ig = t_joint = 0.0
        for text in texts:
            toks = model.to_tokens(text)
            base = "zero"
            if args.baseline == "corrupt":
                same = [t for t in by_len[toks.shape[1]] if t != text]
                other = [t for t in same if decision[t] != decision[text]] or same
                base = model.to_tokens(other[0])
            start = time.perf_counter()
            atp = attribute(patch, model, toks, answer=(tell, hide), method="atp", baseline=base)
            t_atp += time.perf_counter() - start
            start = time.perf_counter()
            ig = attribute(patch, model, toks, answer=(tell, hide), method="ig", steps=args.steps, baseline=base)
            t_ig += time.perf_counter() - start
            start = time.perf_counter()
            joint = attribute(patch, model, toks, answer=(tell, hide), method="ig", steps=args.steps, baseline=base,
                              path="joint")
            t_joint += time.perf_counter() - start
            latents = [int(i) for i in torch.nonzero(atp.active).flatten()]
            if args.baseline == "corrupt":  # a latent active only on the corrupted prompt changes too
                latents = [int(i) for i in torch.nonzero(atp.per_position.abs().sum((0, 1)) > 0).flatten()]
            start = time.perf_counter()
            exact = exact_latent_effects(patch, model, toks, latents, answer=(tell, hide), baseline=base)
            t_exact += time.perf_counter() - start
            a, g, j = atp.scores[latents].numpy(), ig.scores[latents].numpy(), joint.scores[latents].numpy()
            pooled["exact"] += exact.tolist()
            pooled["atp"] += a.tolist()
            pooled["ig"] += g.tolist()
            pooled["ig_joint"] += j.tolist()
            per_case.append({"n_active": len(latents), "spearman_atp": _correlations(a, exact)[0],
                             "spearman_ig": _correlations(g, exact)[0], "spearman_ig_joint": _correlations(j, exact)[0],
                             "recall_atp": top_k_recall(a, exact, args.k), "recall_ig": top_k_recall(g, exact, args.k),
                             "recall_ig_joint": top_k_recall(j, exact, args.k)})
        db.close()
    ex = np.array(pooled["exact"])
    s_atp, p_atp = _correlations(np.array(pooled["atp"]), ex)
    s_ig, p_ig = _correlations(np.array(pooled["ig"]), ex)
    s_joint, p_joint = _correlations(np.array(pooled["ig_joint"]), ex)

    def med(key: str) -> float:
        return float(statistics.median(c[key] for c in per_case if np.isfinite(c[key])))

    figures = {"model": model.cfg.model_name, "baseline": args.baseline, "cases": len(per_case), "ig_steps": args.steps, "k": args.k,
               "mean_active_latents": float(np.mean([c["n_active"] for c in per_case])),
               "spearman_ig_pooled": s_ig, "spearman_atp_pooled": s_atp, "pearson_ig_pooled": p_ig,
               "pearson_atp_pooled": p_atp, "spearman_ig_median_case": med("spearman_ig"),
               "spearman_atp_median_case": med("spearman_atp"), "spearman_ig_joint_pooled": s_joint,
               "pearson_ig_joint_pooled": p_joint, "spearman_ig_joint_median_case": med("spearman_ig_joint"),
               "top_k_recall_ig_joint_mean": float(np.mean([c["recall_ig_joint"] for c in per_case])),
               "seconds_ig_joint": t_joint, "time_ratio_ig_joint": t_joint / t_exact, "top_k_recall_ig_mean":
               float(np.mean([c["recall_ig"] for c in per_case])), "top_k_recall_atp_mean":
               float(np.mean([c["recall_atp"] for c in per_case])), "seconds_exact": t_exact, "seconds_atp": t_atp,
               "seconds_ig": t_ig, "time_ratio_atp": t_atp / t_exact, "time_ratio_ig": t_ig / t_exact}
    print(f"== attribution vs the exact single-latent sweep: {len(per_case)} cases, "
          f"{figures['mean_active_latents']:.0f} active latents per case ==  torch threads: {torch.get_num_threads()}")
    print(f"IG, latent path ({args.steps} steps): Spearman pooled {s_ig:.3f}, median per case {figures['spearman_ig_median_case']:.3f};"
          f" top-{args.k} recall {figures['top_k_recall_ig_mean']:.3f}  (targets >= 0.9, >= 0.9)")
    print(f"IG, joint path ({args.steps} steps):  Spearman pooled {s_joint:.3f}, median per case "
          f"{figures['spearman_ig_joint_median_case']:.3f}; top-{args.k} recall {figures['top_k_recall_ig_joint_mean']:.3f}")
    print(f"AtP:                        Spearman pooled {s_atp:.3f}, median per case {figures['spearman_atp_median_case']:.3f};"
          f" top-{args.k} recall {figures['top_k_recall_atp_mean']:.3f}  (target >= 0.8)")
    print(f"time: exact sweep {t_exact:.2f}s, AtP {t_atp:.2f}s ({figures['time_ratio_atp']:.4f}x), IG {t_ig:.2f}s "
          f"({figures['time_ratio_ig']:.4f}x), IG joint {t_joint:.2f}s ({figures['time_ratio_ig_joint']:.4f}x)  (target <= 0.02x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"figures": figures, "per_case": per_case}, indent=2))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
