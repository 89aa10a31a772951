"""Forward pass with a spliced SAE vs the bare forward, on the same batch, interleaved.

A 4-layer, d_model 256 HookedTransformer (random init) and a 2,048-latent TopK SAE spliced at
``blocks.1.hook_resid_post`` (with the error term, so logits are unchanged, and without it).

    .venv/bin/python benchmarks/patch_bench.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import describe, header, interleaved, ratio  # noqa: E402

from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig  # noqa: E402
from interlatent.patch import LatentPatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=args.tokens,
                                  d_vocab=4096, act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    patch = LatentPatch(SparseAutoencoder(SparseCoderConfig(d_in=256, d_sae=2048, k=32), seed=0), "llm.layer.1")
    tokens = torch.randint(0, 4096, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    keep = patch.hooks(model=model)
    splice = patch.hooks(model=model, keep_error=False)

    def bare() -> None:
        with torch.inference_mode():
            model(tokens)

    def spliced() -> None:
        with torch.inference_mode():
            model.run_with_hooks(tokens, fwd_hooks=keep)

    def recon() -> None:
        with torch.inference_mode():
            model.run_with_hooks(tokens, fwd_hooks=splice)

    header(f"patched forward, batch {args.batch} x {args.tokens} tokens, d_model 256, 2048 latents")
    times = interleaved({"bare forward": bare, "SAE spliced (error kept)": spliced, "SAE spliced (no error)": recon},
                        repeats=args.repeats)
    for name, t in times.items():
        print(f"{name:26s} {describe(t)}")
    print(f"spliced (error kept) / bare: {ratio(times, 'SAE spliced (error kept)', 'bare forward'):.3f}x  (target <= 1.5x)")
    print(f"spliced (no error)   / bare: {ratio(times, 'SAE spliced (no error)', 'bare forward'):.3f}x")


if __name__ == "__main__":
    main()
