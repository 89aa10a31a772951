"""Figures of the character-ablation experiment, and the dashboard of its store.

latent x speaker heatmap (mean activation of each speaker's top latents), ablation effects against
their random-latent controls (error bars: one standard deviation over control seeds), per-token
traces of the top latents over one dilemma told in each voice, the decision study's dose-response
curves (flip rate and margin change against the number of top-attribution latents ablated, every
SAE seed, controls shaded), attribution against exact single-latent patching (a scatter per
method), and ``report.html``.

    python demos/character_ablations/visualize.py --results demo_out/characters/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from interlatent import LatentDB  # noqa: E402
from interlatent.vis import queries  # noqa: E402
from interlatent.vis.dashboard import build_dashboard  # noqa: E402


def dose_response_figure(res: dict, speakers: list[str], path: Path) -> Path:
    """Per speaker: flip rate and margin change vs latents ablated, one line per SAE seed, controls shaded."""
    fig, axes = plt.subplots(2, len(speakers), figsize=(3.2 * len(speakers), 6), squeeze=False)
    for j, s in enumerate(speakers):
        for run in res["decision_study"]:
            rows = run[s]["dose"]
            if not rows:
                continue
            n = [r["n_latents"] for r in rows]
            for i, (key, ctrl) in enumerate((("flip_rate", "control_flip"), ("delta_margin", "control_delta"))):
                ax = axes[i, j]
                line, = ax.plot(n, [r[key] for r in rows], marker="o", label=f"attribution, SAE seed {run['seed']}")
                mean = np.array([r[f"{ctrl}_mean"] for r in rows])
                std = np.array([r[f"{ctrl}_std"] for r in rows])
                ax.plot(n, mean, ls="--", color=line.get_color(), alpha=0.6)
                ax.fill_between(n, mean - std, mean + std, color=line.get_color(), alpha=0.12)
                sel = run[s].get("dose_selectivity") or []
                if sel:
                    ax.plot([r["n_latents"] for r in sel], [r[key] for r in sel], ls=":", color=line.get_color(),
                            alpha=0.8)
        for i, label in enumerate(("decision flip rate", "margin change (tell - hide)")):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel("latents ablated")
            axes[i, j].set_ylabel(label)
            axes[i, j].axhline(0, color="0.6", lw=0.7)
        axes[0, j].set_title(f"{s} (rule without speaker: {res['decision_summary'][s]['rule_flip_rate_without_speaker']:.2f})",
                             fontsize=8)
    axes[0, 0].legend(fontsize=6, title="solid: top by attribution; dashed: random (±1 sd); dotted: by selectivity",
                      title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def agreement_figure(agreement: dict, path: Path) -> Path:
    """Estimated against exact single-latent effects, one panel per method."""
    fig, axes = plt.subplots(1, len(agreement), figsize=(4.2 * len(agreement), 4), squeeze=False)
    for ax, (method, ag) in zip(axes[0], agreement.items()):
        est, exact = np.array(ag["estimated"]), np.array(ag["exact"])
        ax.scatter(exact, est, s=8, alpha=0.6)
        lo, hi = float(min(exact.min(), est.min())), float(max(exact.max(), est.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
        ax.set_xlabel("exact single-latent patching (margin change)")
        ax.set_ylabel(f"{method.upper()} estimate")
        ax.set_title(f"{method.upper()}: Spearman {ag['spearman']:.2f}, top-{ag['k']} recall {ag['top_k_recall']:.2f}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="demo_out/characters/results.json")
    ap.add_argument("--out", help="figure folder (default: next to the results)")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    out = Path(args.out or Path(args.results).parent)
    out.mkdir(parents=True, exist_ok=True)
    speakers = list(res["selectivity"])
    layer = res["latent_layer"]
    written = []
    with LatentDB(res["db"], mode="r") as db:
        latents = [c for s in speakers for c in res["selectivity"][s]["top_latents"][:4]]
        grid = np.zeros((len(latents), len(speakers)))
        for j, s in enumerate(speakers):
            acts = db.fetch_activations(layer, label=s, channels=latents, metrics=False).values
            grid[:, j] = acts.mean(0)
        fig, ax = plt.subplots(figsize=(5, 0.32 * len(latents) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(speakers)), speakers)
        ax.set_yticks(range(len(latents)), [f"latent {c}" for c in latents], fontsize=8)
        ax.set_title("mean activation of each speaker's top latents")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(out / "latent_speaker_heatmap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        x = np.arange(len(speakers))
        abl = res["ablations"]
        for ax, key, ctrl, title in ((axes[0], "probe_accuracy_drop", "control_accuracy_drop", "probe accuracy drop"),
                                     (axes[1], "logit_diff_change", "control_logit_diff_change",
                                      "decision logit diff change (tell - hide)")):
            ax.bar(x - 0.18, [abl[s][key] for s in speakers], 0.36, label="top latents ablated")
            ax.bar(x + 0.18, [abl[s][f"{ctrl}_mean"] for s in speakers], 0.36,
                   yerr=[abl[s][f"{ctrl}_std"] for s in speakers], capsize=4, label="random latents (control)")
            ax.set_xticks(x, speakers)
            ax.axhline(0, color="0.5", lw=0.8)
            ax.set_title(title)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "ablation_vs_control.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        seqs = db.sequences()
        first = seqs["context"].map(lambda c: c.get("dilemma_id")).iloc[0]
        fig, axes = plt.subplots(len(speakers), 1, figsize=(11, 2.1 * len(speakers)))
        for ax, s in zip(np.atleast_1d(axes), speakers):
            row = seqs[(seqs["label"] == s) & (seqs["context"].map(lambda c: c.get("dilemma_id")) == first)]
            if row.empty:
                continue
            top = res["selectivity"][s]["top_latents"][:3]
            df = queries.trace(db, layer, int(row["prompt_index"].iloc[0]), top)
            for c in top:
                ax.plot(df[f"ch{c}"].to_numpy(), label=f"latent {c}")
            ax.set_xticks(range(len(df)), df["token"].fillna(""), rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{s}: dilemma {first}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        written.append(out / "top_latent_traces.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        if res.get("decision_study"):
            written.append(dose_response_figure(res, speakers, out / "dose_response.png"))
        if res.get("agreement"):
            written.append(agreement_figure(res["agreement"], out / "attribution_vs_exact.png"))
        written.append(build_dashboard(db, out / "report.html", layers=[layer]))
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
