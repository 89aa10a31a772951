"""Activation patching between two prompts that differ in one word, per layer.

The same dilemma is told with "it is trivial" (the teen hides) and with "lives are at stake" (the teen
tells). Patching the clean run's activation at each hook point into the corrupted run shows where the
decision logit difference (tell - hide) is carried.

    python demos/activation_patching_demo.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from interlatent.llm import demo_model
from interlatent.llm import demo_corpus as dc
from interlatent.patch import activation_patching


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out/patching")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = demo_model(quick=args.quick)
    situation = "I found a wallet with cash on the bus"
    # a grave cue (the teen tells) vs a trivial one (the teen hides), of equal token length
    pairs = [(g, t) for g in dc.SEVERITY_CUES[4] for t in dc.SEVERITY_CUES[1]]
    for grave, trivial in pairs:
        clean = f"ngl {situation} lol and like {grave} ngl.{dc.DECISION_PREFIX}"
        corrupt = f"ngl {situation} lol and like {trivial} ngl.{dc.DECISION_PREFIX}"
        ct, xt = model.to_tokens(clean), model.to_tokens(corrupt)
        if ct.shape == xt.shape:
            break
    else:
        raise SystemExit("no grave/trivial cue pair tokenizes to equal lengths with this tokenizer")
    tell, hide = (model.tokenizer.encode(a, add_special_tokens=False)[0] for a in dc.ANSWERS)
    points = [f"llm.layer.{b}{k}" for b in range(model.cfg.n_layers) for k in (".resid_pre", ".attn_out", ".mlp_out", "")]
    every = activation_patching(model, ct, xt, points, answer=(tell, hide))
    last = activation_patching(model, ct, xt, points, answer=(tell, hide), positions=[-1])
    every["restored_last_position_only"] = last["restored"].to_numpy()
    print(f"clean logit diff (tell - hide) {every['logit_diff_clean'].iloc[0]:+.3f}, corrupted "
          f"{every['logit_diff_corrupted'].iloc[0]:+.3f}")
    print(every[["point", "logit_diff_patched", "restored", "restored_last_position_only"]].to_string(index=False))
    every.to_csv(out / "activation_patching.csv", index=False)
    result = {"clean": clean, "corrupted": corrupt, "rows": json.loads(every.to_json(orient="records"))}
    (out / "activation_patching.json").write_text(json.dumps(result, indent=2))
    print(f"outputs in {out}/")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
