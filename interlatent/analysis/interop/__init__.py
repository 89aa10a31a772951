"""Interop with the dictionaries the field already has: SAELens and EleutherAI sparsify folders in,
SAELens folders out (:mod:`.saelens`, :mod:`.sparsify`); SAELens activation caches in and out
(:mod:`.activation_cache`, layout in :mod:`.cache_format`); latent layers out as Neuronpedia
feature JSON and delphi latent caches (:mod:`.exports`); ``run_with_cache`` with dictionaries
attached, as SAELens's ``HookedSAETransformer`` (:mod:`.cache`)."""

from interlatent.analysis.interop.activation_cache import CacheImport, export_saelens_cache, import_saelens_cache
from interlatent.analysis.interop.cache import SAE_HOOKS, run_with_cache
from interlatent.analysis.interop.cache_format import CacheColumn, SAELensCache, read_saelens_cache
from interlatent.analysis.interop.exports import (
    NEURONPEDIA_FEATURE_KEYS,
    delphi_module_name,
    export_delphi,
    export_neuronpedia,
)
from interlatent.analysis.interop.saelens import (
    SAELENS_ARCHITECTURES,
    SAELENS_CFG,
    SAELENS_FORMAT_VERSION,
    SAELENS_WEIGHTS,
    export_saelens,
    load_saelens,
)
from interlatent.analysis.interop.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, hookpoint_layers, load_sparsify

__all__ = ["NEURONPEDIA_FEATURE_KEYS", "SAE_HOOKS", "SAELENS_ARCHITECTURES", "SAELENS_CFG", "SAELENS_FORMAT_VERSION",
           "SAELENS_WEIGHTS", "SPARSIFY_CFG", "SPARSIFY_WEIGHTS", "delphi_module_name", "export_delphi",
           "export_neuronpedia", "export_saelens", "hookpoint_layers", "load_saelens", "load_sparsify",
           "run_with_cache"]
__all__ += ["CacheColumn", "CacheImport", "SAELensCache", "export_saelens_cache", "import_saelens_cache",
            "read_saelens_cache"]
