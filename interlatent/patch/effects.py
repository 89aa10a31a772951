"""Measured effects of interventions, each against a control.

* :func:`measure` — next-token loss change, KL divergence from the clean distribution and an answer
  logit difference, for one intervention on a batch of prompts.
* :func:`ablation_effect` — the same for ablating chosen latents, next to a control: as many
  randomly chosen latents of similar activation frequency, over several seeds, with mean and spread.
  Controls are drawn only from latents active where the ablation acts (a latent that never fires
  there changes nothing when ablated, so it cannot fail as a control).
* :func:`splice_quality` — CE loss with the reconstruction spliced in, against clean and against
  zero- and mean-ablating the hook point: ``loss_recovered = (CE_abl - CE_spliced) / (CE_abl - CE_clean)``
  (the zero-ablation score is SAELens's ``ce_loss_score``) and the KL score likewise.

The pieces live in :mod:`.reach` (where an edit can act, answer positions), :mod:`.measure` (one
effect, activations at a point) and :mod:`.controls` (random-latent controls); every name stays
importable from here. An effect that cannot be non-zero is refused before anything runs (see
:mod:`.reach`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int, Shaped
from torch import Tensor

from interlatent.patch.controls import ControlledEffect, _frequencies_from_db, ablation_effect, matched_control_latents
from interlatent.patch.core import LatentPatch, logits_of
from interlatent.patch.measure import (METRIC_READS, Effect, Intervention, _ablate_point, _activations_at,
                                       _as_point, _capture, _kl, _kl_per_position, _loss_mask, _loss_per_token,
                                       _masked_mean, _mean_loss, _measure, capture_latents, edit_effect,
                                       latent_frequencies, measure)
from interlatent.patch.reach import (AnswerPosition, _describe_position, _last_index, _read_positions, _real,
                                     answer_columns, logit_diff, positionwise_after, reachable_logits,
                                     require_effect_can_be_nonzero)


@torch.no_grad()
def splice_quality(patch: LatentPatch, model: Any, tokens: Int[Tensor, "batch pos"], *,
                   attention_mask: Shaped[Tensor, "batch pos"] | None = None, db: Any = None) -> dict[str, float]:
    """CE loss and KL with the reconstruction spliced in (no error term) vs clean and vs zero- and
    mean-ablating the patched output hook. Recorded in ``db`` if given."""
    _, p_out = patch.check_model(model)
    mask = attention_mask.float() if attention_mask is not None else None
    clean = logits_of(model, tokens, attention_mask)
    with patch.applied(model, keep_error=False):
        spliced = logits_of(model, tokens, attention_mask)
    with _ablate_point(model, p_out, 0.0):
        zeroed = logits_of(model, tokens, attention_mask)
    flat = _activations_at(model, p_out, tokens, attention_mask)
    with _ablate_point(model, p_out, flat.mean(0)):
        meaned = logits_of(model, tokens, attention_mask)
    ce = {name: _mean_loss(lg, tokens, mask) for name, lg in
          (("clean", clean), ("spliced", spliced), ("zero_ablated", zeroed), ("mean_ablated", meaned))}
    kl = {name: _kl(clean, lg, mask) for name, lg in (("spliced", spliced), ("zero_ablated", zeroed),
                                                      ("mean_ablated", meaned))}

    def recovered(abl: float, spl: float, cln: float) -> float:
        return (abl - spl) / (abl - cln) if abs(abl - cln) > 1e-12 else float("nan")

    out = {
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablated": ce["zero_ablated"],
        "ce_mean_ablated": ce["mean_ablated"],
        "loss_recovered_zero": recovered(ce["zero_ablated"], ce["spliced"], ce["clean"]),
        "loss_recovered_mean": recovered(ce["mean_ablated"], ce["spliced"], ce["clean"]),
        "kl_spliced": kl["spliced"], "kl_zero_ablated": kl["zero_ablated"], "kl_mean_ablated": kl["mean_ablated"],
        "kl_score_zero": (kl["zero_ablated"] - kl["spliced"]) / kl["zero_ablated"] if kl["zero_ablated"] else float("nan"),
        "kl_score_mean": (kl["mean_ablated"] - kl["spliced"]) / kl["mean_ablated"] if kl["mean_ablated"] else float("nan"),
    }
    if db is not None:
        db.add_intervention(patch.name, "splice_quality", {"keep_error": False, "n_prompts": int(tokens.shape[0])}, out)
    return out


__all__ = ["ControlledEffect", "Effect", "ablation_effect", "answer_columns", "capture_latents", "edit_effect",
           "latent_frequencies", "logit_diff", "matched_control_latents", "measure", "positionwise_after",
           "reachable_logits", "require_effect_can_be_nonzero", "splice_quality"]
