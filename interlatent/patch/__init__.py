"""Patching: splice / ablate / clamp / steer dictionary latents, activation patching between prompts,
and effect measurement against controls."""

from interlatent.patch.activation import activation_patching
from interlatent.patch.agreement import attribution_agreement
from interlatent.patch.attribution import attribute
from interlatent.patch.components import component_attribution
from interlatent.patch.core import Edits, LatentPatch, latent_frequencies_from_db, latent_means_from_db, logits_of
from interlatent.patch.effects import ablation_effect, measure, splice_quality
from interlatent.patch.steering import dose_response, steering_effect

__all__ = ["Edits", "LatentPatch", "ablation_effect", "activation_patching", "attribute", "attribution_agreement",
           "component_attribution", "dose_response", "latent_frequencies_from_db", "latent_means_from_db", "logits_of",
           "measure", "splice_quality", "steering_effect"]
