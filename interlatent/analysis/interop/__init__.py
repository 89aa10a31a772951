"""Interop with the dictionaries the field already has: SAELens and EleutherAI sparsify folders in,
SAELens folders out (:mod:`.saelens`, :mod:`.sparsify`)."""

from interlatent.analysis.interop.saelens import (
    SAELENS_ARCHITECTURES,
    SAELENS_CFG,
    SAELENS_FORMAT_VERSION,
    SAELENS_WEIGHTS,
    export_saelens,
    load_saelens,
)
from interlatent.analysis.interop.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, hookpoint_layers, load_sparsify

__all__ = ["SAELENS_ARCHITECTURES", "SAELENS_CFG", "SAELENS_FORMAT_VERSION", "SAELENS_WEIGHTS", "SPARSIFY_CFG",
           "SPARSIFY_WEIGHTS", "export_saelens", "hookpoint_layers", "load_saelens", "load_sparsify"]
