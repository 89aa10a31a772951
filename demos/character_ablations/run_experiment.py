"""Does the model encode who is speaking, which latents carry it, and does ablating them matter?

1. collect the residual stream (and MLP in/out) of every prompt at the last block;
2. probe the speaker from mean-pooled activations, split by dilemma (unseen dilemmas in the test
   set), against the majority baseline;
3. train an SAE and a transcoder on that block; splice quality of each;
4. rank SAE latents by speaker selectivity (standardized mean difference, speaker vs the rest);
5. for each speaker, ablate its top latents on its own held-out prompts and measure the change in
   probe accuracy and in the decision logit difference (tell - hide), against random latents of
   similar activation frequency over several seeds.

    python demos/character_ablations/run_experiment.py --dataset demo_out/characters/dilemmas.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.llm import PromptDataset, demo_model, load_model
from interlatent.llm import demo_corpus as dc
from interlatent.patch import LatentPatch, splice_quality
from interlatent.patch.effects import matched_control_latents
from interlatent.vis import queries


def pooled_activations(model, patch, texts, edits, hook_name):
    """Mean-pooled activation at ``hook_name`` per prompt, with the patch's edits applied there."""
    out = []
    for text in texts:
        tokens = model.to_tokens(text)
        store = {}
        hooks = patch.hooks(**edits, model=model) if edits else []
        hooks = hooks + [(hook_name, lambda act, hook: store.__setitem__("x", act.detach()))]
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        out.append((store["x"][0].mean(0), logits[0, -1]))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def _summary(seed: int, res: dict) -> dict:
    keys = ("logit_diff_change", "control_logit_diff_change_mean", "control_logit_diff_change_std",
            "probe_accuracy_drop", "logit_effect_exceeds_control", "accuracy_effect_exceeds_control")
    return {"seed": seed, **{k: res[k] for k in keys}}


def ablation_study(db, model, latent_layer, probe, hook_name, args, *, record: bool):
    """Rank latents by speaker selectivity; ablate each speaker's top latents on its held-out
    prompts (the dilemmas the probe never saw) against frequency-matched random controls.
    Returns (selectivity, per-speaker results); ``record`` writes them to the store."""
    from interlatent.analysis.train.pipelines import split_prompts
    from interlatent.patch.core import latent_frequencies_from_db

    pm = probe.metrics
    patch = LatentPatch.from_db(db, latent_layer)
    seqs = db.sequences()
    dilemma_of = {int(p): c["dilemma_id"] for p, c in zip(seqs["prompt_index"], seqs["context"])}
    _, test_dilemmas = split_prompts(sorted(set(dilemma_of.values()), key=str), 0.25, 0)
    test_prompts = {p for p, d in dilemma_of.items() if d in set(test_dilemmas)}
    freqs = latent_frequencies_from_db(db, latent_layer)
    tell, hide = (model.tokenizer.encode(a, add_special_tokens=False)[0] for a in dc.ANSWERS)
    names = [c.name for c in dc.CHARACTERS]
    class_of = {n: i for i, n in enumerate(pm["classes"])}
    rng = np.random.default_rng(0)
    per_speaker = {}
    selectivity = {}
    for ch in names:
        others = [n for n in names if n != ch]
        rows = []
        for other in others:
            d = queries.diff(db, latent_layer, label_a=ch, label_b=other)
            rows.append(d.set_index("channel")["std_diff"])
        score = sum(rows) / len(rows)
        top = [int(c) for c in score.sort_values(ascending=False).index[: args.top_latents]]
        selectivity[ch] = {"top_latents": top, "scores": [round(float(score[c]), 3) for c in top]}
        texts = [t for t, lb, p in zip(seqs["text"], seqs["label"], seqs["prompt_index"]) if lb == ch and p in test_prompts]

        def evaluate(latents):
            acts, last = pooled_activations(model, patch, texts, {"ablate": latents} if latents else None, hook_name)
            acc = float((probe.module.predict(acts) == class_of[ch]).float().mean())
            ld = float((last[:, tell] - last[:, hide]).mean())
            return acc, ld

        base_acc, base_ld = evaluate(None)
        abl_acc, abl_ld = evaluate(top)
        controls = []
        for _ in range(args.controls):
            c = matched_control_latents(freqs, top, rng)
            controls.append((c, *evaluate(c)))
        ctrl_acc = np.array([a for _, a, _ in controls])
        ctrl_ld = np.array([b for _, _, b in controls])
        res = {"n_prompts": len(texts), "probe_accuracy_clean": base_acc, "probe_accuracy_ablated": abl_acc,
               "probe_accuracy_drop": base_acc - abl_acc, "control_accuracy_drop_mean": float(base_acc - ctrl_acc.mean()),
               "control_accuracy_drop_std": float(ctrl_acc.std(ddof=1)), "logit_diff_clean": base_ld,
               "logit_diff_ablated": abl_ld, "logit_diff_change": abl_ld - base_ld,
               "control_logit_diff_change_mean": float(ctrl_ld.mean() - base_ld),
               "control_logit_diff_change_std": float(ctrl_ld.std(ddof=1)),
               "control_latents": [c for c, _, _ in controls]}
        res["accuracy_effect_exceeds_control"] = bool(
            res["probe_accuracy_drop"] - res["control_accuracy_drop_mean"] > 2 * max(res["control_accuracy_drop_std"], 1e-9))
        res["logit_effect_exceeds_control"] = bool(
            abs(res["logit_diff_change"] - res["control_logit_diff_change_mean"])
            > 2 * max(res["control_logit_diff_change_std"], 1e-9))
        per_speaker[ch] = res
        if not record:
            continue
        db.add_intervention(latent_layer, "ablation", {"ablate": top, "speaker": ch, "mode": "zero"},
                            {"metric": "probe_accuracy_drop", "value": res["probe_accuracy_drop"],
                             "control_mean": res["control_accuracy_drop_mean"],
                             "control_std": res["control_accuracy_drop_std"], **{k: v for k, v in res.items()
                                                                                 if k != "control_latents"}})
        print(f"{ch:12s} ablate {len(top)} latents: probe accuracy {base_acc:.2f} -> {abl_acc:.2f} "
              f"(control drop {res['control_accuracy_drop_mean']:+.2f} ± {res['control_accuracy_drop_std']:.2f}); "
              f"logit diff {base_ld:+.2f} -> {abl_ld:+.2f} (control change {res['control_logit_diff_change_mean']:+.2f} "
              f"± {res['control_logit_diff_change_std']:.2f})")
    return selectivity, per_speaker


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="demo_out/characters/dilemmas.csv")
    ap.add_argument("--model", help="a TransformerLens name or a local HF checkpoint (default: the embedded model)")
    ap.add_argument("--out", default="demo_out/characters")
    ap.add_argument("--quick", action="store_true", help="the small embedded model and fewer steps")
    ap.add_argument("--top-latents", type=int, default=8, help="latents ablated per speaker")
    ap.add_argument("--controls", type=int, default=8, help="random-latent control sets (seeds)")
    ap.add_argument("--sae-seeds", type=int, default=1, help="also train the SAE with this many seeds and report"
                    " how often each effect exceeds its control (default 1: one SAE)")
    ap.add_argument("--block", type=int, default=0, help="block whose residual stream is probed and ablated (default 0:"
                    " later blocks can still carry an ablation to the decision position)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = PromptDataset.from_csv(args.dataset, text_col="text", label_col="label")
    model = load_model(args.model) if args.model else demo_model(quick=args.quick)
    block = args.block if args.block >= 0 else model.cfg.n_layers + args.block
    layer = f"llm.layer.{block}"
    hook_name = f"blocks.{block}.hook_resid_post"
    db_path = out / "characters.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db = LatentDB(db_path)
    LLMCollector(db, layer_indices=[block], hooks=["resid_post", "mlp_in", "mlp_out"],
                 prompt_context_fn=ds.prompt_context_fn(), token_metrics_fn=ds.token_metrics_fn("label"),
                 batch_size=16).run(model, prompts=ds.texts)

    probe = train_linear_probe(db, layer=layer, target_key="label", pool="mean", split_key="dilemma_id",
                               test_fraction=0.25, epochs=300, lr=0.02, seed=0)
    pm = probe.metrics
    print(f"speaker probe on unseen dilemmas: accuracy {pm['accuracy']:.3f} vs majority baseline "
          f"{pm['baseline_accuracy']:.3f} ({pm['test_prompts']} prompts)")
    steps = 300 if args.quick else 800
    # extra SAE training seeds first: the main run (seed 0) trains last, so the store keeps its latents
    robustness: dict[str, list[dict]] = {}
    for seed in range(1, args.sae_seeds):
        extra = SAEPipeline(db, layer, k=8, steps=steps, progress=False, seed=seed).run()
        db.compute_stats(min_count=3, layers=[extra.latent_layer])
        _, ablations = ablation_study(db, model, extra.latent_layer, probe, hook_name, args, record=False)
        for ch, res in ablations.items():
            robustness.setdefault(ch, []).append(_summary(seed, res))
    sae = SAEPipeline(db, layer, k=8, steps=steps, progress=False).run()
    tc = TranscoderPipeline(db, layer, k=8, steps=steps, progress=False).run()
    db.compute_stats(min_count=3, layers=[sae.latent_layer, tc.latent_layer])
    patch = LatentPatch.from_db(db, sae.latent_layer)
    by_length: dict[int, list[str]] = {}
    for text in ds.texts:
        by_length.setdefault(model.to_tokens(text).shape[1], []).append(text)
    sample = model.to_tokens(max(by_length.values(), key=len)[:16])  # equal lengths: no padding in the loss
    splice = {"sae": splice_quality(patch, model, sample, db=db),
              "transcoder": splice_quality(LatentPatch.from_db(db, tc.latent_layer), model, sample, db=db)}
    print(f"splice: SAE loss recovered {splice['sae']['loss_recovered_zero']:.3f}, transcoder "
          f"{splice['transcoder']['loss_recovered_zero']:.3f}")
    selectivity, per_speaker = ablation_study(db, model, sae.latent_layer, probe, hook_name, args, record=True)
    for ch, res in per_speaker.items():
        robustness.setdefault(ch, []).insert(0, _summary(0, res))
    if args.sae_seeds > 1:
        print(f"across {args.sae_seeds} SAE training seeds, how often each effect exceeds its control:")
        for ch, runs in robustness.items():
            n_ld = sum(r["logit_effect_exceeds_control"] for r in runs)
            n_acc = sum(r["accuracy_effect_exceeds_control"] for r in runs)
            changes = ", ".join(f"{r['logit_diff_change']:+.2f}" for r in runs)
            print(f"  {ch:12s} decision {n_ld}/{len(runs)}  probe accuracy {n_acc}/{len(runs)}  "
                  f"(logit diff changes {changes})")
    results = {"model": model.cfg.model_name, "layer": layer, "probe": {k: pm[k] for k in
               ("accuracy", "baseline_accuracy", "test_prompts", "classes")}, "sae": sae.metrics,
               "transcoder": tc.metrics, "splice": splice, "selectivity": selectivity, "ablations": per_speaker,
               "seeds": robustness if args.sae_seeds > 1 else None,
               "latent_layer": sae.latent_layer, "db": str(db_path)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    db.close()
    print(f"results -> {out / 'results.json'}; store -> {db_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
