"""``run_with_cache`` with dictionaries attached, as SAELens's ``HookedSAETransformer`` does.

The cache gains, for every attached dictionary reading TransformerLens hook ``H`` (and, for a
transcoder, writing hook ``O``):

===============================  ==============================================================
key                              value
===============================  ==============================================================
``H.hook_sae_input``             the activation the dictionary reads ``[batch pos d_in]``
``H.hook_sae_acts_pre``          its pre-activations ``[batch pos d_sae]``
``H.hook_sae_acts_post``         its latents ``[batch pos d_sae]`` (zero where inactive)
``O.hook_sae_recons``            the reconstruction (SAE) or predicted output (transcoder)
``O.hook_sae_error``             the model's activation at ``O`` minus the reconstruction
``O.hook_sae_output``            what the model carried on with: the activation itself, or the
                                 reconstruction with ``splice=True``
===============================  ==============================================================

the names SAELens gives its SAE's own hook points under ``H``. By default the model runs
unchanged (SAELens's ``use_error_term=True``); ``splice=True`` replaces the activation at ``O`` by
the reconstruction, so downstream activations, the logits and the rest of the cache are those of
the spliced model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from interlatent.analysis.models import SparseCoder
from interlatent.errors import ConfigError
from interlatent.backends import make_backend
from interlatent.patch.core import LatentPatch, at_hook

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")


def _patches(dictionaries: Sequence[LatentPatch | SparseCoder] | LatentPatch | SparseCoder) -> list[LatentPatch]:
    if isinstance(dictionaries, (LatentPatch, SparseCoder)):
        dictionaries = [dictionaries]
    out = []
    for d in dictionaries:
        if isinstance(d, LatentPatch):
            out.append(d)
        elif isinstance(d, SparseCoder):
            layer = (d.cfg.metadata or {}).get("layer")
            if layer is None:
                raise ConfigError("a dictionary without a recorded layer: attach LatentPatch(module, layer) instead")
            out.append(LatentPatch(d, layer))
        else:
            raise ConfigError(f"attach LatentPatch or SparseCoder objects, got {type(d).__name__}")
    return out


@torch.no_grad()
def run_with_cache(model: Any, tokens: Tensor, dictionaries: Sequence[LatentPatch | SparseCoder] | LatentPatch |
                   SparseCoder, *, splice: bool = False, attention_mask: Tensor | None = None,
                   **run_kwargs: Any) -> tuple[Tensor, Any]:  # (logits, ActivationCache or dict)
    """Logits and a cache holding the attached dictionaries' latents under TL-style names (see
    the module docstring).

    For a ``HookedTransformer`` the cache is the model's own ``run_with_cache`` cache (an
    ``ActivationCache``; ``run_kwargs`` such as ``names_filter`` go to it) with the dictionary
    entries added; for a Hugging Face model it holds the dictionary entries only. Two
    dictionaries may not write the same hook point.
    """
    patches = _patches(dictionaries)
    points = [p.check_model(model) for p in patches]
    outs = [p_out.tl_name for _, p_out in points]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"two attached dictionaries write the same hook point ({sorted(outs)}); attach one per "
                          "hook point")
    found: dict[str, Tensor] = {}

    def reader(patch: LatentPatch, p_in: Any, p_out: Any, seen: dict[str, Tensor]):
        module = patch.module

        def encode(x_in: Tensor) -> tuple[Tensor, Tensor]:
            flat = x_in.reshape(-1, x_in.shape[-1]).to(module.W_enc.dtype)
            f = module.encode_dense(flat)
            recon = module.decode(f, x=flat)
            batch_pos = x_in.shape[:-1]
            found[f"{p_in.tl_name}.hook_sae_input"] = x_in.detach().clone()
            found[f"{p_in.tl_name}.hook_sae_acts_pre"] = module.pre_acts(flat).reshape(*batch_pos, -1)
            found[f"{p_in.tl_name}.hook_sae_acts_post"] = f.reshape(*batch_pos, -1)
            return f, recon.reshape(*batch_pos, -1)

        def at_out(act: Tensor) -> Tensor | None:
            x_in = act if p_in.tl_name == p_out.tl_name else seen.pop("x")
            _, recon = encode(x_in)
            recon = recon.to(act.dtype)
            found[f"{p_out.tl_name}.hook_sae_recons"] = recon
            found[f"{p_out.tl_name}.hook_sae_error"] = act - recon
            found[f"{p_out.tl_name}.hook_sae_output"] = recon if splice else act.detach().clone()
            return recon if splice else None

        return at_out

    with ExitStack() as stack:
        for patch, (p_in, p_out) in zip(patches, points):
            seen: dict[str, Tensor] = {}
            if p_in.tl_name != p_out.tl_name:
                stack.enter_context(at_hook(model, p_in, lambda act, seen=seen: seen.__setitem__("x", act)))
            stack.enter_context(at_hook(model, p_out, reader(patch, p_in, p_out, seen)))
        logits, cache = make_backend(model).run_with_cache(tokens, attention_mask, **run_kwargs)
    if cache is None:
        return logits, found
    from transformer_lens import ActivationCache

    return logits, ActivationCache({**cache.cache_dict, **found}, model)


__all__ = ["SAE_HOOKS", "run_with_cache"]
