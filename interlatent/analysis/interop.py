"""Interop: write a trained SAE in SAELens's on-disk format, so SAELens users can load it.

SAELens reads a folder with ``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]`` and ``b_dec`` ``[d_in]``
(``SAE.load_from_disk(folder)``). TopK SAEs map to architecture ``"topk"`` with ``k``; ReLU SAEs to
``"standard"``. Both apply ``b_dec`` to the input, as ours do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from interlatent import naming
from interlatent.analysis.models import SparseAutoencoder
from interlatent.errors import ConfigError

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def export_saelens(sae: SparseAutoencoder, folder: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, hook_layer: int | None = None,
                   context_size: int | None = None, prepend_bos: bool | None = True) -> Path:
    """Write ``sae`` to ``folder`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout).

    ``hook_name`` is the TransformerLens hook the SAE reads (e.g. ``blocks.8.hook_resid_post``);
    when omitted it is taken from the SAE's metadata: the hook the pipeline recorded from the
    stored layer, else the hook of its canonical layer name (``llm.layer.8`` ->
    ``blocks.8.hook_resid_post``). ``hook_layer`` defaults to that hook's block.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise ConfigError(f"only SparseAutoencoder exports to SAELens; got {type(sae).__name__}")
    meta = sae.cfg.metadata or {}
    hook_name = hook_name or meta.get("hook_name") or naming.tl_hook_name(meta.get("in_layer") or meta.get("layer")
                                                                        or "")
    if hook_name is None:
        log.warning("export_saelens: the SAE records no TransformerLens hook; pass hook_name= so SAELens knows "
                    "where it reads")
    if hook_layer is None:
        hook_layer = meta.get("block") if meta.get("block") is not None else (
            naming.block_of(hook_name) if hook_name else None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().t().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    save_file(tensors, str(folder / SAELENS_WEIGHTS))
    cfg: dict[str, Any] = {
        "architecture": "topk" if sae.cfg.activation == "topk" else "standard",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name or meta.get("model"),
            "hook_name": hook_name,
            "hook_layer": hook_layer,
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            # the layout written here is SAELens 6's; without a version it would be read as a
            # pre-6 config and lose this metadata
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
        },
    }
    if sae.cfg.activation == "topk":
        cfg["k"] = sae.cfg.k
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))
    return folder
