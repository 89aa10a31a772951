"""The workflow on a real model: a TransformerLens model name, or a local Hugging Face checkpoint.

    RUN_LLM_REAL=1 python demos/llm_real_model_demo.py                      # gpt2 (needs its weights cached)
    RUN_LLM_REAL=1 LLM_MODEL=/path/to/checkpoint python demos/llm_real_model_demo.py

Without RUN_LLM_REAL=1 it only says how to run it (nothing downloads by default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOW = ("Set RUN_LLM_REAL=1 to run this demo on a real model. LLM_MODEL picks it: a TransformerLens model name "
       "(its weights must be cached or reachable) or a local Hugging Face checkpoint directory (save_pretrained "
       "output, GPT-2 or Llama family), e.g.\n  RUN_LLM_REAL=1 LLM_MODEL=./my-checkpoint python "
       "demos/llm_real_model_demo.py")

PROMPTS = [
    "The Eiffel Tower is in the city of", "The capital of Japan is", "My favourite colour is blue because",
    "When I found the lost wallet I decided to", "The cat sat on the", "Two plus two equals",
    "She opened the door and saw", "In the morning I like to drink",
]


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RUN_LLM_REAL") != "1":
        print(HOW)
        return 0
    from interlatent import LatentDB, LLMCollector
    from interlatent.analysis.train import SAEPipeline
    from interlatent.llm import load_model
    from interlatent.vis import queries

    name = os.environ.get("LLM_MODEL", "gpt2")
    out = Path(os.environ.get("DEMO_OUT", "demo_out/real"))
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(name)
    if model.tokenizer is None:
        print(f"{name} has no tokenizer; save one next to the checkpoint", file=sys.stderr)
        return 1
    print(f"loaded {name}: {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}")
    db_path = out / "real.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db = LatentDB(db_path)
    block = model.cfg.n_layers // 2
    LLMCollector(db, layer_indices=[block], hooks=["resid_post", "mlp_in", "mlp_out"], batch_size=4,
                 metrics=["next_token_loss"]).run(model, prompts=PROMPTS * 4, max_new_tokens=4)
    db.compute_stats(min_count=2)
    print(f"collected {db.n_tokens(f'llm.layer.{block}')} tokens from block {block} into {db_path}")
    sae = SAEPipeline(db, f"llm.layer.{block}", k=16, steps=200, progress=False).run()
    print(f"SAE held-out FVU {sae.metrics['fvu']:.3f}, L0 {sae.metrics['l0']:.1f}")
    print(queries.search(db, layer=sae.latent_layer, top=5)[["channel", "value", "context"]].to_string(index=False))
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
